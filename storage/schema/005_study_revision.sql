-- A revision counter both writers of a study bump: an ingest commit adding instances to an
-- existing study and a sweep marking it for deletion. DuckDB detects write conflicts per
-- column, so the second of two concurrent transactions fails and retries, and sees the other.
-- Without it the two could each miss the other's write (write skew): the sweep would delete
-- instance rows that arrived after it listed the study's objects, orphaning those objects.
ALTER TABLE studies ADD COLUMN rev INTEGER DEFAULT 0;
