-- Policy versions (files under {manifests}/policy/) and who was told of each material one.
CREATE TABLE policy_versions (
    version      VARCHAR PRIMARY KEY,
    effective_on DATE NOT NULL,
    material     BOOLEAN NOT NULL,
    text_sha256  VARCHAR NOT NULL,           -- SHA-256 of the policy's text, as published
    file         VARCHAR NOT NULL,           -- the file it came from
    recorded_at  TIMESTAMPTZ NOT NULL
);
-- A policy file that could not be taken, with why (the good ones still apply).
CREATE TABLE policy_rejects (
    file        VARCHAR NOT NULL,
    content_sha VARCHAR NOT NULL,            -- of the file's bytes: one row per content
    reason      VARCHAR NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (file, content_sha)
);
-- One row per account told of a material version: a rerun adds nobody twice.
CREATE TABLE policy_notices (
    version     VARCHAR NOT NULL,
    account     VARCHAR NOT NULL,
    role        VARCHAR NOT NULL,            -- owner | grantee
    batch_id    VARCHAR NOT NULL,            -- the outbox batch that carried the notice
    notified_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (version, account)
);
-- A batch of notices for the mailer, written to {outbox}/policy/ once its rows are in.
CREATE TABLE policy_batches (
    batch_id   VARCHAR PRIMARY KEY,
    version    VARCHAR NOT NULL,
    accounts   INTEGER NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    written_at TIMESTAMPTZ                   -- NULL until its file is in the outbox
);
