-- What a deletion must verify is gone, recorded when the study is marked: object names (random
-- ids, no PHI) and record key ids. A sweep killed after the catalog rows are deleted can then
-- still verify on its next run. Rows are removed once their request is verified.
CREATE TABLE deletion_objects (
    request_id    VARCHAR NOT NULL,
    study_key     VARCHAR NOT NULL,   -- the tombstone key, never the UID
    location_url  VARCHAR,            -- NULL for the study's own record key
    name          VARCHAR,
    record_key_id VARCHAR NOT NULL
);
