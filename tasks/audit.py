"""The audit trail: one writer for ``audit_log``, by column name.

Every row says who (``actor``), did what (``action``), to what (``subject``: a keyed id
or a count, never PHI) and when, with a PHI-free JSON ``detail``. Call :func:`audit`
inside the catalog transaction that does the work, so the trail and the change land
together or not at all.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import duckdb

from dropvault.storage.catalog import Catalog, insert_rows


def audit(
    con: duckdb.DuckDBPyConnection,
    *,
    actor: str,
    action: str,
    subject: str | None,
    detail: dict[str, Any] | None,
    at: datetime,
) -> str:
    """Append one ``audit_log`` row; returns its ``event_id``."""
    event_id = uuid.uuid4().hex
    insert_rows(
        con,
        "audit_log",
        [
            {
                "event_id": event_id,
                "occurred_at": at,
                "actor": actor,
                "action": action,
                "subject": subject,
                "detail": None if detail is None else json.dumps(detail),
            }
        ],
    )
    return event_id


def audit_viewing(catalog: Catalog, *, actor: str, action: str, subject: str | None) -> None:
    """One audit row in a transaction of its own, for a read that must leave a trace (an
    operator opening names, exporting a quarantined file)."""
    now = datetime.now(UTC)
    catalog.write(
        lambda con: audit(con, actor=actor, action=action, subject=subject, detail=None, at=now)
    )
