-- Recipient-encrypted delivery (tasks/recipients.py, tasks/delivery.py).
-- A grantee's age X25519 public keys, versioned: a new key is a new version, the old one
-- retired (its packages are withdrawn and built again for the new key).
CREATE TABLE recipient_keys (
    user_id       VARCHAR NOT NULL,          -- the grantee's account
    version       INTEGER NOT NULL,          -- 1, 2, ... per account
    public_key    VARCHAR NOT NULL,          -- age1... (X25519), validated by pyrage
    request_id    VARCHAR NOT NULL,          -- the manifest row that registered it
    registered_at TIMESTAMPTZ NOT NULL,
    -- replaced by a newer version, or removed
    retired_at    TIMESTAMPTZ,
    PRIMARY KEY (user_id, version)
);
CREATE TABLE recipient_requests (
    request_id   VARCHAR PRIMARY KEY,        -- the manifest's id, or manifest#line for a bad row
    content_hash VARCHAR,                    -- detects a reused id with other content
    action       VARCHAR,                    -- register | remove
    user_id      VARCHAR,
    requested_at TIMESTAMPTZ,                -- a valid row's time: the latest applied one decides
    manifest     VARCHAR NOT NULL,
    line         INTEGER NOT NULL,
    outcome      VARCHAR NOT NULL,           -- applied | duplicate | rejected:<reason>
    processed_at TIMESTAMPTZ NOT NULL
);
-- The share requests that asked for delivery (deliver: true); a grant is delivered while
-- the share in force (grants.grant_request_id) is one of them.
CREATE TABLE delivery_requests (
    request_id VARCHAR PRIMARY KEY
);
-- One package: a study's images for one grantee, age-encrypted to one key version.
CREATE TABLE deliveries (
    delivery_id      VARCHAR PRIMARY KEY,    -- random; names the package
    owner            VARCHAR NOT NULL,
    grantee          VARCHAR NOT NULL,
    study_uid        VARCHAR NOT NULL,
    grant_request_id VARCHAR NOT NULL,
    key_version      INTEGER NOT NULL,
    study_rev        INTEGER NOT NULL,       -- studies.rev when built: a change rebuilds it
    name             VARCHAR NOT NULL,       -- the object's name in the outbox
    files            INTEGER,
    bytes            BIGINT,
    status           VARCHAR NOT NULL,       -- writing | delivered | withdrawn
    created_at       TIMESTAMPTZ NOT NULL,
    expires_at       TIMESTAMPTZ NOT NULL,
    withdrawn_at     TIMESTAMPTZ,
    withdraw_reason  VARCHAR                 -- not_in_force | expired | key_changed | replaced | failed
);
