-- The UIDs a deletion's catalog scan must not find, kept only until the scan passes: a
-- sweep whose scan failed seals them here (under a record key of their own) so the next
-- sweep can scan again; once clean, the key is destroyed and the rows deleted.
CREATE TABLE deletion_scans (
    request_id    VARCHAR NOT NULL,
    record_key_id VARCHAR NOT NULL,
    needles_enc   BLOB NOT NULL
);
