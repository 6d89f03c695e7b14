-- Weekly and monthly beacon hits (P7), compiled from the days' cells under one audit with
-- the days they cover. Weeks are the month's days 1-7, 8-14, 15-21 and 22 to its end, so
-- every week lies in one month. Hidden cells have NULL hits.
CREATE TABLE beacon_rollups (
    period      VARCHAR NOT NULL,            -- week | month
    first_day   DATE NOT NULL,
    last_day    DATE NOT NULL,
    days        VARCHAR NOT NULL,            -- the compiled days it covers, comma-separated
    beacon      VARCHAR NOT NULL,
    target      VARCHAR NOT NULL,            -- '*' = total over targets
    partner     VARCHAR NOT NULL,            -- '*' = total over partners
    hits        BIGINT,
    suppressed  BOOLEAN NOT NULL,
    compiled_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (period, first_day, beacon, target, partner)
);
