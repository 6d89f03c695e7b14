"""Access under a grant: a user's export of an image, checked against the grants in force.

A grant is what lets someone other than the owner read an image. :func:`export_for` lets a
user export an instance only when they own its study (active or archived) or hold a grant
in force that covers it (``study_access``: not expired, not revoked, the study active).
Every attempt, allowed or refused, is one ``audit_log`` row (action ``access_export``)
naming who, the study by its keyed id (never its UID), when, the purpose given, and the
outcome; an owner reads them in their access report. A refusal writes nothing and says
one line that names no UID.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from dropvault.storage.errors import TerminalError
from dropvault.storage.home import Home
from dropvault.tasks.audit import audit
from dropvault.tasks.exports import ExportError, export_instance
from dropvault.tasks.manifests import UID_IN_NAME
from dropvault.tasks.phi import study_key

ACTION = "access_export"
MAX_PURPOSE = 200


class AccessRefused(TerminalError, PermissionError):
    """The user may not access this image (the message names no UID)."""


def access_via(home: Home, user: str, study_uid: str) -> str | None:
    """How ``user`` may access the study now: ``owner``, ``grant:study``, ``grant:all``, or
    None. An owner keeps access to an archived study; a grantee does not."""
    rows = home.catalog.query(
        "SELECT via FROM study_access WHERE study_uid = ? AND user_id = ?"
        " UNION ALL SELECT 'owner' FROM studies"
        " WHERE study_uid = ? AND owner = ? AND status = 'archived'",
        [study_uid, user, study_uid, user],
    )
    vias = set(rows["via"])
    for via in ("owner", "grant:study", "grant:all"):
        if via in vias:
            return via
    return None


def _record(home: Home, user: str, subject: str, detail: dict[str, Any]) -> None:
    now = datetime.now(UTC)

    def write(con: duckdb.DuckDBPyConnection) -> None:
        audit(con, actor=user, action=ACTION, subject=subject, detail=detail, at=now)

    home.catalog.write(write)


def export_for(
    home: Home, user: str, sop_instance_uid: str, out: Path, purpose: str = ""
) -> dict[str, Any]:
    """Export an image to ``out`` as ``user``: allowed for its owner and its grantees in
    force, refused (:class:`AccessRefused`, nothing written) otherwise; audited either way.
    A purpose that quotes a UID is refused before anything is looked up."""
    user = user.strip()
    if not user:
        raise AccessRefused("a user is required")
    if len(purpose) > MAX_PURPOSE or UID_IN_NAME.search(purpose) or UID_IN_NAME.search(user):
        raise AccessRefused(
            f"the user and purpose must not quote a UID (purpose: {MAX_PURPOSE} characters at most)"
        )
    found = home.catalog.query(
        "SELECT study_uid FROM instances WHERE sop_instance_uid = ?", [sop_instance_uid]
    )
    study_uid = str(found["study_uid"].iloc[0]) if not found.empty else None
    via = access_via(home, user, study_uid) if study_uid else None
    subject = study_key(home.pepper, study_uid) if study_uid else None
    detail: dict[str, Any] = {"purpose": purpose, "via": via}
    if via is None:
        # The same refusal for an unknown image as for one the user may not see: the
        # answer must not tell a stranger which UIDs exist.
        _record(home, user, subject or "unknown", {**detail, "outcome": "refused"})
        raise AccessRefused(f"{user} may not access this image")
    try:
        result = export_instance(home, sop_instance_uid, out, actor=user, audited=False)
    except ExportError as exc:
        _record(home, user, str(subject), {**detail, "outcome": "failed"})
        raise AccessRefused(str(exc)) from None
    _record(home, user, str(subject), {**detail, "outcome": "allowed", "bytes": result["bytes"]})
    return {**result, "via": via}
