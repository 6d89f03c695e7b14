-- duckdb-only: DuckLake tables never had keys, so there is nothing to rebuild there.
-- `instances` and `objects` grow by one row per image, and their PRIMARY KEY was an ART index
-- that DuckDB 1.5 writes out whole at every checkpoint, that is at every batch commit. At 1 M rows
-- that cost 57 ms for the insert and 339 ms for the checkpoint of a 500-row batch, against
-- 2 ms and 12 ms without it (benchmarks/README.md), and it grew with every image ingested.
-- The keys still hold: every write takes the single catalog_writes row (007), so writes are
-- serial, and ingest re-checks the UIDs inside its transaction, as on DuckLake.
CREATE TABLE instances_unindexed (
    sop_instance_uid VARCHAR NOT NULL,
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
    sha256           VARCHAR NOT NULL,
    size_bytes       BIGINT NOT NULL,
    ingested_at      TIMESTAMPTZ NOT NULL
);
INSERT INTO instances_unindexed SELECT * FROM instances;
DROP TABLE instances;
ALTER TABLE instances_unindexed RENAME TO instances;

CREATE TABLE objects_unindexed (
    object_id       VARCHAR NOT NULL,
    kind            VARCHAR NOT NULL,
    location_url    VARCHAR NOT NULL,
    region          VARCHAR NOT NULL,
    name            VARCHAR NOT NULL,
    record_key_id   VARCHAR NOT NULL,
    plaintext_bytes BIGINT NOT NULL,
    stored_bytes    BIGINT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL
);
INSERT INTO objects_unindexed SELECT * FROM objects;
DROP TABLE objects;
ALTER TABLE objects_unindexed RENAME TO objects;
