-- Deletion: requests with their 24 h due time, and PHI-free tombstones of what was deleted.

CREATE TABLE deletion_requests (
    request_id    VARCHAR PRIMARY KEY,       -- the manifest's id, or manifest#line for a bad row
    content_hash  VARCHAR,
    owner         VARCHAR,
    study_uid     VARCHAR,                   -- '*' = every study of the owner
    requested_at  TIMESTAMPTZ,
    keep_archive  BOOLEAN,
    due_at        TIMESTAMPTZ,               -- requested_at + 24 h
    status        VARCHAR NOT NULL,          -- pending | completed | rejected
    outcome       VARCHAR NOT NULL,          -- applied | rejected:<reason>
    manifest      VARCHAR NOT NULL,
    line          INTEGER NOT NULL,
    received_at   TIMESTAMPTZ NOT NULL,
    completed_at  TIMESTAMPTZ,
    verified_at   TIMESTAMPTZ,
    studies       INTEGER NOT NULL DEFAULT 0,
    objects       INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE tombstones (
    study_key    VARCHAR PRIMARY KEY,        -- keyed hash of the study UID, never the UID
    request_id   VARCHAR NOT NULL,
    outcome      VARCHAR NOT NULL,           -- deleted | archived
    created_at   TIMESTAMPTZ NOT NULL,
    completed_at TIMESTAMPTZ,
    instances    INTEGER NOT NULL DEFAULT 0,
    objects      INTEGER NOT NULL DEFAULT 0,
    versions     INTEGER NOT NULL DEFAULT 0,
    keys         INTEGER NOT NULL DEFAULT 0
);

-- SLA with the default at-risk window (6 h); tasks.deletion.deletion_sla takes another.
CREATE VIEW deletion_sla AS
SELECT
    request_id, owner, study_uid, keep_archive, requested_at, due_at, completed_at, verified_at,
    CASE
        WHEN status = 'completed' AND completed_at > due_at THEN 'breached'
        WHEN status = 'completed' THEN 'completed'
        WHEN now() > due_at THEN 'breached'
        WHEN due_at - now() <= INTERVAL 6 HOUR THEN 'at_risk'
        ELSE 'pending'
    END AS sla_state
FROM deletion_requests
WHERE status <> 'rejected';
