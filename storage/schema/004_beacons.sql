-- Beacon and e-mail statistics: aggregates only (P7). Hidden cells have NULL counts.
CREATE TABLE beacon_stats (
    day             DATE NOT NULL,
    beacon          VARCHAR NOT NULL,        -- page_view | email_open | email_open_mpp | cobrand | unsubscribe
    target          VARCHAR NOT NULL,        -- '*' = total over targets
    partner         VARCHAR NOT NULL,        -- '*' = total over partners
    hits            BIGINT,
    unique_visitors BIGINT,
    suppressed      BOOLEAN NOT NULL,
    PRIMARY KEY (day, beacon, target, partner)
);

CREATE TABLE beacon_days (
    day         VARCHAR PRIMARY KEY,
    files       INTEGER, lines BIGINT, malformed BIGINT, rejected BIGINT, scrubbed BIGINT,
    bots        BIGINT, mpp_opens BIGINT, third_party BIGINT, counted BIGINT,
    cells       INTEGER, suppressed INTEGER, unsubscribes INTEGER,
    compiled_at TIMESTAMPTZ NOT NULL
);

CREATE TABLE beacon_rejects (day VARCHAR, file VARCHAR, line BIGINT, reason VARCHAR);

CREATE TABLE newsletter_suppression (
    address_key VARCHAR PRIMARY KEY,         -- keyed hash of the address or visitor id
    first_seen  TIMESTAMPTZ NOT NULL,
    source      VARCHAR NOT NULL
);

-- Open rate per campaign where a sends file was given; opens are distinct visitors.
CREATE TABLE email_campaigns (
    day                DATE NOT NULL,
    campaign           VARCHAR NOT NULL,
    sends              BIGINT,
    opens              BIGINT,               -- without Apple MPP proxy opens
    opens_with_mpp     BIGINT,
    open_rate          DOUBLE,
    open_rate_with_mpp DOUBLE,
    suppressed         BOOLEAN NOT NULL,
    PRIMARY KEY (day, campaign)
);
