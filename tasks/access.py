"""Access under a grant: a user's export of an image, checked against the grants in force.

A grant is what lets someone other than the owner read an image. :func:`export_for` lets a
user export an instance only when they own its study (active or archived) or hold a grant
in force that covers it (``study_access``: not expired, not revoked, the study active).
Every attempt, allowed or refused, is one ``audit_log`` row (action ``access_export``)
naming who, the study by its keyed id (never its UID), when, and the outcome; the purpose
given is free text that can name the patient, so it is sealed under the study's record
key (gone with the study). An owner reads them in their access report. A refusal writes
nothing and says one line that names no UID.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from dropvault.storage.errors import TerminalError
from dropvault.storage.home import Home
from dropvault.storage.keystore import KeyDestroyedError
from dropvault.tasks.audit import audit
from dropvault.tasks.exports import ExportError, export_instance
from dropvault.tasks.manifests import UID_IN_NAME
from dropvault.tasks.phi import open_fields, seal_fields, study_key

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
    if not user or len(user) > MAX_PURPOSE or not user.isprintable():
        # The account goes into the audit row as is: no control characters (a newline
        # would forge a second line in any text export of the log).
        raise AccessRefused("a user is required: printable, 200 characters at most")
    if len(purpose) > MAX_PURPOSE or UID_IN_NAME.search(purpose) or UID_IN_NAME.search(user):
        raise AccessRefused(
            f"the user and purpose must not quote a UID (purpose: {MAX_PURPOSE} characters at most)"
        )
    found = home.catalog.query(
        "SELECT i.study_uid, s.record_key_id FROM instances i JOIN studies s USING (study_uid)"
        " WHERE i.sop_instance_uid = ?",
        [sop_instance_uid],
    )
    study_uid = str(found["study_uid"].iloc[0]) if not found.empty else None
    via = access_via(home, user, study_uid) if study_uid else None
    subject = study_key(home.pepper, study_uid) if study_uid else None
    detail: dict[str, Any] = {"via": via}
    if subject and purpose:
        # Free text can name the patient: sealed under the study's record key, so the
        # study's deletion takes it too; the owner's access report opens it.
        key = home.keystore.unwrap(str(found["record_key_id"].iloc[0]))
        sealed = seal_fields(key, subject, {"purpose": purpose})
        detail["purpose_enc"] = base64.b64encode(sealed).decode()
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


REPORT_COLUMNS = ["at", "kind", "who", "study_uid", "outcome", "why"]


def access_report(home: Home, owner: str, since: datetime | None = None) -> pd.DataFrame:
    """Every access to ``owner``'s records since ``since`` (default: all), newest last, one
    row each with who, when and why: exports under a grant (allowed, refused or failed) and
    operator exports, the grants (those in force whatever their date), packages delivered
    to grantees (and whether withdrawn), disclosures and
    wrong-access incidents. This is the log a patient asks for: it names the owner's own
    studies and the people they were shared with, nobody else's records."""
    since = since or datetime(1970, 1, 1, tzinfo=UTC)
    q = home.catalog.read_only()
    studies = q.sql("SELECT study_uid, record_key_id FROM studies WHERE owner = ?", [owner])
    by_key = {study_key(home.pepper, str(s)): str(s) for s in studies["study_uid"]}
    keys = {
        study_key(home.pepper, str(s)): str(k)
        for s, k in zip(studies["study_uid"], studies["record_key_id"], strict=True)
    }
    frames = q.many(
        [
            (
                "SELECT occurred_at AS at, actor AS who, subject, detail FROM audit_log"
                " WHERE action = ? AND occurred_at >= ?"
                " AND subject IN (SELECT unnest(?::VARCHAR[]))",
                [ACTION, since, sorted(by_key)],
            ),
            (
                "SELECT a.occurred_at AS at, a.actor AS who, i.study_uid FROM audit_log a"
                " JOIN instances i ON i.sop_instance_uid = a.subject"
                " JOIN studies s USING (study_uid)"
                " WHERE a.action = 'export' AND s.owner = ? AND a.occurred_at >= ?",
                [owner, since],
            ),
            (
                "SELECT granted_at AS at, grantee AS who, study_uid, status AS outcome"
                " FROM access_list WHERE owner = ? AND (granted_at >= ? OR status = 'active')",
                [owner, since],
            ),
            (
                "SELECT disclosed_at AS at, recipient AS who, study_uid, purpose AS why"
                " FROM disclosures WHERE owner = ? AND disclosed_at >= ?",
                [owner, since],
            ),
            (
                "SELECT created_at AS at, grantee AS who, study_uid, status, withdraw_reason,"
                " files FROM deliveries WHERE owner = ? AND status <> 'writing'"
                " AND (created_at >= ? OR status = 'delivered')",
                [owner, since],
            ),
            (
                "SELECT n.reported_at AS at, n.reported_user AS who, n.study_uid,"
                " n.grants_revoked FROM incidents n JOIN studies s USING (study_uid)"
                " WHERE s.owner = ? AND n.reported_at >= ?",
                [owner, since],
            ),
        ]
    )
    exports, operator, grants, disclosed, delivered, incidents = frames
    rows: list[tuple[Any, ...]] = []
    for r in exports.itertuples(index=False):
        detail = json.loads(str(r.detail or "{}"))
        why = _purpose(home, keys.get(str(r.subject)), str(r.subject), detail)
        rows.append((r.at, "export", r.who, by_key[str(r.subject)], detail["outcome"], why))
    for r in operator.itertuples(index=False):
        rows.append((r.at, "export", f"operator ({r.who})", r.study_uid, "allowed", ""))
    for r in grants.itertuples(index=False):
        rows.append((r.at, "grant", r.who, r.study_uid, r.outcome, ""))
    for r in disclosed.itertuples(index=False):
        rows.append((r.at, "disclosure", r.who, r.study_uid, "disclosed", r.why))
    for r in delivered.itertuples(index=False):
        state = "delivered" if r.status == "delivered" else f"withdrawn ({r.withdraw_reason})"
        why = f"package of {r.files} image(s), encrypted to the grantee's key"
        rows.append((r.at, "delivery", r.who, r.study_uid, state, why))
    for r in incidents.itertuples(index=False):
        revoked = f"{r.grants_revoked} grant(s) revoked"
        rows.append((r.at, "incident", r.who, r.study_uid, revoked, "wrong access reported"))
    frame = pd.DataFrame(rows, columns=REPORT_COLUMNS)
    return frame.sort_values("at", kind="stable").reset_index(drop=True)


def _purpose(home: Home, key_id: str | None, subject: str, detail: dict[str, Any]) -> str:
    """The purpose an export gave, opened with the study's record key."""
    sealed = detail.get("purpose_enc")
    if not sealed or key_id is None:
        return ""
    try:
        key = home.keystore.unwrap(key_id)
    except KeyDestroyedError:
        return "(erased)"
    return open_fields(key, subject, base64.b64decode(sealed)).get("purpose", "")
