-- Keyed hashes (HMAC under the pepper, as tombstones.study_key) of the UIDs a file's
-- bytes name. A quarantined file that cannot be parsed still belongs to a study: deletion
-- finds it by any UID of the study, its series or its instances (quarantine_uids), and a
-- damaged copy arriving after the deletion is matched against the deleted study's series
-- and instance UIDs (tombstone_uids) as a whole copy is against tombstones.
CREATE TABLE quarantine_uids (
    quarantine_id VARCHAR NOT NULL,
    uid_key       VARCHAR NOT NULL,
    PRIMARY KEY (quarantine_id, uid_key)
);
CREATE TABLE tombstone_uids (
    uid_key   VARCHAR PRIMARY KEY,
    study_key VARCHAR NOT NULL
);
