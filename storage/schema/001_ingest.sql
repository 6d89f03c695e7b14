-- Ingest spine: where images came from, what they are, where their encrypted bytes live.
-- No PHI in plain text: patients are a keyed pseudonym (patient_key); name, birth date
-- and patient ID are only in studies.phi_enc, encrypted under the study's record key.

CREATE TABLE facilities (
    facility_id   VARCHAR PRIMARY KEY,
    first_seen_at TIMESTAMPTZ NOT NULL
);

CREATE TABLE drops (
    facility_id   VARCHAR NOT NULL,
    drop_id       VARCHAR NOT NULL,
    has_manifest  BOOLEAN NOT NULL,
    status        VARCHAR NOT NULL,          -- done | incomplete
    files_seen    INTEGER NOT NULL DEFAULT 0,
    ingested      INTEGER NOT NULL DEFAULT 0,
    duplicates    INTEGER NOT NULL DEFAULT 0,
    quarantined   INTEGER NOT NULL DEFAULT 0,
    bytes         BIGINT  NOT NULL DEFAULT 0,
    first_seen_at TIMESTAMPTZ NOT NULL,
    completed_at  TIMESTAMPTZ,
    PRIMARY KEY (facility_id, drop_id)
);

CREATE TABLE studies (
    study_uid     VARCHAR PRIMARY KEY,
    patient_key   VARCHAR NOT NULL,          -- HMAC-SHA256(pepper, issuer | patient id)
    owner         VARCHAR NOT NULL,          -- account that may share and delete
    facility_id   VARCHAR NOT NULL,
    record_key_id VARCHAR NOT NULL,
    phi_enc       BLOB,                      -- AES-256-GCM under the record key
    status        VARCHAR NOT NULL DEFAULT 'active',
    created_at    TIMESTAMPTZ NOT NULL
);

CREATE TABLE objects (
    object_id       VARCHAR PRIMARY KEY,
    kind            VARCHAR NOT NULL,        -- instance | quarantine
    location_url    VARCHAR NOT NULL,        -- data residency (P8)
    region          VARCHAR NOT NULL,
    name            VARCHAR NOT NULL,        -- relative to location_url
    record_key_id   VARCHAR NOT NULL,
    plaintext_bytes BIGINT NOT NULL,
    stored_bytes    BIGINT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL
);

CREATE TABLE instances (
    sop_instance_uid VARCHAR PRIMARY KEY,
    study_uid        VARCHAR NOT NULL,
    series_uid       VARCHAR NOT NULL,
    sop_class_uid    VARCHAR,
    modality         VARCHAR,
    transfer_syntax  VARCHAR,
    rows             INTEGER,
    columns          INTEGER,
    frames           INTEGER,
    facility_id      VARCHAR NOT NULL,
    drop_id          VARCHAR NOT NULL,
    object_id        VARCHAR NOT NULL,
    sha256           VARCHAR NOT NULL,       -- of the dropped bytes, for dedup
    size_bytes       BIGINT NOT NULL,
    ingested_at      TIMESTAMPTZ NOT NULL
);

CREATE TABLE quarantine (
    quarantine_id  VARCHAR PRIMARY KEY,      -- keyed hash of facility, drop, name, content
    facility_id    VARCHAR NOT NULL,
    drop_id        VARCHAR NOT NULL,
    reason         VARCHAR NOT NULL,
    detail         VARCHAR,                  -- PHI-free, from a fixed vocabulary
    object_id      VARCHAR NOT NULL,
    study_uid      VARCHAR,                  -- when the header named one (deletion finds it)
    size_bytes     BIGINT NOT NULL,
    sha256         VARCHAR NOT NULL,
    source_name_enc BLOB,                    -- file names can hold PHI: encrypted
    quarantined_at TIMESTAMPTZ NOT NULL
);

CREATE TABLE audit_log (
    event_id VARCHAR PRIMARY KEY,
    occurred_at TIMESTAMPTZ NOT NULL,
    actor    VARCHAR NOT NULL,
    action   VARCHAR NOT NULL,
    subject  VARCHAR,
    detail   VARCHAR                         -- JSON, PHI-free
);
