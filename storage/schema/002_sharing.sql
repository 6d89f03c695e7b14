-- Sharing: every request is kept (share_requests); grants hold the current state of each
-- (owner, grantee, study_uid) key, derived from its latest event by requested_at, so the
-- result does not depend on the order in which manifests arrive.

CREATE TABLE share_requests (
    request_id   VARCHAR PRIMARY KEY,        -- the manifest's id, or manifest#line for a bad row
    content_hash VARCHAR,                    -- detects a reused id with other content
    action       VARCHAR,
    owner        VARCHAR,
    grantee      VARCHAR,
    study_uid    VARCHAR,
    requested_at TIMESTAMPTZ,
    expires_at   TIMESTAMPTZ,
    purpose      VARCHAR,
    manifest     VARCHAR NOT NULL,
    line         INTEGER NOT NULL,
    outcome      VARCHAR NOT NULL,           -- applied | rejected:<reason>
    processed_at TIMESTAMPTZ NOT NULL
);

CREATE TABLE grant_events (
    event_id     VARCHAR PRIMARY KEY,        -- request id (or incident:<id>:<n>)
    action       VARCHAR NOT NULL,           -- share | revoke
    owner        VARCHAR NOT NULL,
    grantee      VARCHAR NOT NULL,
    study_uid    VARCHAR NOT NULL,           -- '*' = every study of the owner
    requested_at TIMESTAMPTZ NOT NULL,
    expires_at   TIMESTAMPTZ,
    actor        VARCHAR NOT NULL,           -- who asked: the owner, or 'incident', 'deletion'
    reason       VARCHAR,                    -- manifest | incident | deleted
    recorded_at  TIMESTAMPTZ NOT NULL
);
CREATE INDEX grant_events_key ON grant_events (owner, grantee, study_uid);

CREATE TABLE grants (
    owner             VARCHAR NOT NULL,
    grantee           VARCHAR NOT NULL,
    study_uid         VARCHAR NOT NULL,      -- '*' = every study of the owner, later ones too
    grant_request_id  VARCHAR NOT NULL,      -- the share now in force (or last in force)
    granted_at        TIMESTAMPTZ NOT NULL,
    expires_at        TIMESTAMPTZ,
    revoked_at        TIMESTAMPTZ,
    revoked_by        VARCHAR,
    revoke_reason     VARCHAR,
    revoke_request_id VARCHAR,
    PRIMARY KEY (owner, grantee, study_uid)
);
CREATE INDEX grants_owner ON grants (owner);

CREATE TABLE disclosures (
    disclosure_id VARCHAR PRIMARY KEY,       -- request id
    owner         VARCHAR NOT NULL,
    recipient     VARCHAR NOT NULL,
    study_uid     VARCHAR NOT NULL,
    description   VARCHAR NOT NULL,          -- scope only, never PHI values
    purpose       VARCHAR NOT NULL,
    disclosed_at  TIMESTAMPTZ NOT NULL,
    recorded_at   TIMESTAMPTZ NOT NULL
);

CREATE TABLE incidents (
    incident_id     VARCHAR PRIMARY KEY,
    reported_user   VARCHAR NOT NULL,
    study_uid       VARCHAR NOT NULL,
    reported_at     TIMESTAMPTZ NOT NULL,
    discovered_at   TIMESTAMPTZ NOT NULL,
    notify_by       TIMESTAMPTZ NOT NULL,    -- discovery + 60 days
    grants_revoked  INTEGER NOT NULL,
    people_affected INTEGER NOT NULL,
    report_md       VARCHAR NOT NULL
);

CREATE VIEW access_list AS
SELECT
    owner,
    grantee,
    CASE WHEN study_uid = '*' THEN 'all' ELSE 'study' END AS scope,
    study_uid,
    granted_at,
    expires_at,
    CASE
        WHEN revoked_at IS NOT NULL THEN 'revoked'
        WHEN expires_at IS NOT NULL AND expires_at <= now() THEN 'expired'
        ELSE 'active'
    END AS status
FROM grants;

-- Who can access each study now: its owner, and every active grant that covers it.
CREATE VIEW study_access AS
SELECT study_uid, owner AS user_id, 'owner' AS via, NULL::TIMESTAMPTZ AS expires_at
FROM studies WHERE status = 'active'
UNION ALL
SELECT s.study_uid, g.grantee AS user_id,
       CASE WHEN g.study_uid = '*' THEN 'grant:all' ELSE 'grant:study' END AS via,
       g.expires_at
FROM studies s
JOIN grants g ON g.owner = s.owner AND (g.study_uid = s.study_uid OR g.study_uid = '*')
WHERE s.status = 'active'
  AND g.revoked_at IS NULL
  AND (g.expires_at IS NULL OR g.expires_at > now());
