"""Where identifiers live in the catalog: declared once, read from the schema.

Every text or binary column of every table and view (``storage/schema``) is one of:

* an **identifier column**, by its name: ``study_uid``, ``series_uid``,
  ``sop_instance_uid``, ``patient_key``, ``drop_id`` (see :data:`BY_NAME`);
* **sealed**: its name ends in ``_enc`` (AES-256-GCM under a record key that deletion
  destroys);
* **free text that can quote an identifier** (:data:`QUOTING`): deletion rewrites it;
* **identifier-free** (:data:`CLEAN`): ids we mint, reason codes, accounts, counts.

Deletion, compaction and status read :func:`columns_of_kind`; ``tests/test_identifiers.py``
fails when a migration adds a text column this module does not classify, so no new
table can hold a study's identifier without deletion knowing.
"""

from __future__ import annotations

import functools

from dropvault.storage.catalog import column_types, tables

BY_NAME = {
    "study_uid": "study",
    "series_uid": "series",
    "sop_instance_uid": "instance",
    "patient_key": "patient",
    "drop_id": "drop",
}
SEALED_SUFFIX = "_enc"
# Free text that can quote an identifier of the kind named; deletion rewrites it.
QUOTING = {
    ("incidents", "report_md"): "study",
    ("audit_log", "subject"): "instance",  # an export's subject is the SOP Instance UID
    # Text an owner or a portal types into a request can quote a UID too.
    **dict.fromkeys(
        [
            # a rejected row's id is "<manifest>#<line>", and a manifest's name is free
            ("share_requests", "request_id"),
            ("deletion_requests", "request_id"),
            ("share_requests", "grantee"),
            ("share_requests", "purpose"),
            ("share_requests", "manifest"),
            ("grants", "grantee"),
            ("grant_events", "grantee"),
            ("disclosures", "recipient"),
            ("disclosures", "purpose"),
            ("disclosures", "description"),
            ("deletion_requests", "manifest"),
            ("incidents", "reported_user"),
            ("recipient_requests", "request_id"),
            ("recipient_requests", "user_id"),
            ("recipient_requests", "manifest"),
            ("deliveries", "grantee"),
            ("policy_notices", "account"),  # a grantee's account is free text
            ("policy_rejects", "file"),
        ],
        "study",
    ),
}
# Text columns that never hold an identifier of a study, a patient or a drop.
CLEAN = frozenset(
    {
        *(("audit_log", c) for c in ("event_id", "actor", "action", "detail")),
        *(("beacon_rejects", c) for c in ("day", "file", "reason")),
        ("beacon_days", "day"),
        *(("beacon_stats", c) for c in ("beacon", "target", "partner")),  # scrubbed
        *(("beacon_rollups", c) for c in ("period", "days", "beacon", "target", "partner")),
        *(("deletion_objects", c) for c in ("request_id", "study_key", "location_url")),
        *(("deletion_scans", c) for c in ("request_id", "record_key_id")),
        ("deletion_objects", "name"),  # a vault object name: a random id
        ("deletion_objects", "record_key_id"),
        *(("deletion_requests", c) for c in ("content_hash", "owner", "status", "outcome")),
        *(("deletion_sla", c) for c in ("request_id", "owner", "sla_state")),
        *(("disclosures", c) for c in ("disclosure_id", "owner")),
        *(("drops", c) for c in ("facility_id", "status", "record_key_id")),
        *(("email_campaigns", c) for c in ("campaign",)),
        *(("facilities", c) for c in ("facility_id",)),
        *(("grant_events", c) for c in ("event_id", "action", "owner", "actor")),
        ("grant_events", "reason"),
        *(("grants", c) for c in ("owner", "grant_request_id", "revoked_by")),
        *(("grants", c) for c in ("revoke_reason", "revoke_request_id")),
        ("incidents", "incident_id"),
        *(("instances", c) for c in ("sop_class_uid", "modality", "transfer_syntax")),
        *(("instances", c) for c in ("facility_id", "object_id", "sha256")),
        ("newsletter_suppression", "address_key"),  # keyed hash
        ("newsletter_suppression", "source"),
        *(("objects", c) for c in ("object_id", "kind", "location_url", "region", "name")),
        ("objects", "record_key_id"),
        *(("quarantine", c) for c in ("quarantine_id", "facility_id", "reason", "detail")),
        *(("quarantine", c) for c in ("object_id", "sha256")),
        *(("share_requests", c) for c in ("content_hash", "action", "owner")),
        ("share_requests", "outcome"),
        *(("studies", c) for c in ("owner", "facility_id", "record_key_id", "status")),
        *(("tombstones", c) for c in ("study_key", "request_id", "outcome")),
        # keyed hashes of UIDs (as tombstones.study_key), and our own ids
        *(("quarantine_uids", c) for c in ("quarantine_id", "uid_key")),
        *(("tombstone_uids", c) for c in ("uid_key", "study_key")),
        # accounts and ids a recipients manifest may only give without a UID, age keys
        *(("recipient_keys", c) for c in ("user_id", "public_key", "request_id")),
        *(("recipient_requests", c) for c in ("content_hash", "action", "outcome")),
        ("delivery_requests", "request_id"),
        # a policy version's id, its text's hash, the file it came from (the operator's)
        *(("policy_versions", c) for c in ("version", "text_sha256", "file")),
        *(("policy_rejects", c) for c in ("content_sha", "reason")),
        *(("policy_notices", c) for c in ("version", "role", "batch_id")),
        *(("policy_batches", c) for c in ("batch_id", "version")),
        *(("deliveries", c) for c in ("delivery_id", "owner", "grant_request_id", "name")),
        *(("deliveries", c) for c in ("status", "withdraw_reason")),
        *(("access_list", c) for c in ("owner", "grantee", "scope", "status")),
        *(("study_access", c) for c in ("user_id", "via")),
    }
)
TEXT_TYPES = ("VARCHAR", "BLOB")


class UnclassifiedColumnError(LookupError):
    """A text column no rule here classifies: say what it holds before it ships."""


def classify(table: str, column: str) -> str:
    """``study``, ``series``, ``instance``, ``patient``, ``drop``, ``sealed``,
    ``quoting:<kind>`` or ``clean``; raises for a column nobody classified."""
    if column in BY_NAME:
        return BY_NAME[column]
    if column.endswith(SEALED_SUFFIX):
        return "sealed"
    if (table, column) in QUOTING:
        return "quoting:" + QUOTING[(table, column)]
    if (table, column) in CLEAN:
        return "clean"
    raise UnclassifiedColumnError(f"{table}.{column} is not classified in storage/identifiers.py")


@functools.cache
def text_columns() -> dict[tuple[str, str], str]:
    """Every text or binary column of the schema's tables and views, classified."""
    return {
        (table, column): classify(table, column)
        for table, cols in column_types().items()
        for column, kind in cols.items()
        if kind.startswith(TEXT_TYPES)
    }


def columns_of_kind(kind: str, *, tables_only: bool = True) -> list[tuple[str, str]]:
    """``(table, column)`` of every column holding identifiers of ``kind``, in name order
    (views left out unless asked: their rows come from the tables)."""
    views = views_in_schema() if tables_only else frozenset()
    return sorted(
        key for key, found in text_columns().items() if found == kind and key[0] not in views
    )


@functools.cache
def views_in_schema() -> frozenset[str]:
    return frozenset(column_types()) - frozenset(tables())
