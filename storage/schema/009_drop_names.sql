-- Drop folder names can be PHI (facilities name them after patients). From here on
-- drops.drop_id (and instances.drop_id, quarantine.drop_id) is a keyed id (d_...), and the
-- real name is only in name_enc, sealed under the drop's own record key. Rows written
-- before this migration are re-keyed by dropvault.tasks.drop_names.rekey_drops, which
-- needs the pepper and so runs from the flows, not here.
ALTER TABLE drops ADD COLUMN record_key_id VARCHAR;
ALTER TABLE drops ADD COLUMN name_enc BLOB;
