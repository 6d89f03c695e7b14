-- One row that every catalog write bumps. On DuckLake (snapshot isolation, and commits that
-- touch different rows are retried automatically) it makes any two overlapping writes
-- conflict, so the later one reruns on fresh data: reads inside a write are never stale.
CREATE TABLE catalog_writes (writes BIGINT NOT NULL);
INSERT INTO catalog_writes VALUES (0);
