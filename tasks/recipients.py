"""The recipients registry: each grantee's age X25519 public key, versioned.

A grantee's portal (or the operator) drops manifests under ``{manifests}/recipients/``,
JSON lines or CSV, one row per request::

    {"request_id": "k-1", "user": "dr.lee", "age_public_key": "age1...",
     "requested_at": "2026-12-02T10:00:00Z"}
    {"request_id": "k-2", "action": "remove", "user": "dr.lee", "requested_at": "..."}

``action`` is ``register`` (the default) or ``remove``. A key is checked by pyrage (only
X25519 ``age1`` recipients: one key type, one audit story). Registering a different key
for an account makes a new version and retires the old one; the change is an audit row
(``recipient_key_registered`` / ``recipient_key_changed`` / ``recipient_key_removed``,
the key by its SHA-256 fingerprint). Packages built for a retired key are withdrawn by the
next delivery run and built again for the new key. A bad row is rejected with its reason
(``recipient_requests``) while the good rows apply; a replayed row is a duplicate.

The registry trusts whoever may write the manifests folder, as share manifests do: the
portal that signs grantees in is the party that vouches for their keys.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import duckdb
import pyrage
from pyrage import x25519

from dropvault.storage.catalog import Catalog, insert_rows
from dropvault.tasks.audit import audit
from dropvault.tasks.manifests import (
    UID_IN_NAME,
    ManifestRow,
    Rejected,
    RowOutcomes,
    checked_row,
    content_hash,
    parse_request_time,
    replay_outcome,
)
from dropvault.tasks.reasons import RejectReason

KIND = "recipients"  # the manifests folder
FIELDS = ("request_id", "action", "user", "age_public_key", "requested_at")
MAX_USER = 200


@dataclass(frozen=True)
class KeyRequest:
    request_id: str
    action: str  # register | remove
    user: str
    public_key: str | None
    requested_at: datetime
    row: ManifestRow
    digest: str


def fingerprint(public_key: str) -> str:
    """A short, stable name for a key in the audit trail."""
    return hashlib.sha256(public_key.encode()).hexdigest()[:16]


def _usable(key: str) -> bool:
    """Whether pyrage takes the key and can encrypt to it: it parses low-order X25519
    points (all zeros, u=1, u=p-1) and then panics when encrypting to them."""
    try:
        pyrage.encrypt(b"", [x25519.Recipient.from_str(key)])
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # noqa: BLE001 - pyrage's PanicException is a BaseException
        return False
    return True


def _validate(row: ManifestRow, now: datetime) -> KeyRequest:
    if row.fields is None:
        raise Rejected(row.error or RejectReason.MALFORMED)
    f = row.fields
    for name in ("request_id", "user", "requested_at"):
        if not f.get(name):
            raise Rejected(RejectReason.MISSING_FIELD)
    user = f["user"]
    if UID_IN_NAME.search(user):
        raise Rejected(RejectReason.UID_IN_NAME)  # an account is kept verbatim
    if len(user) > MAX_USER or not user.isprintable():
        raise Rejected(RejectReason.MALFORMED)
    action = (f.get("action") or "register").lower()
    if action not in ("register", "remove"):
        raise Rejected(RejectReason.UNKNOWN_ACTION)
    key = f.get("age_public_key") or None
    if action == "register":
        if key is None:
            raise Rejected(RejectReason.MISSING_FIELD)
        if not key.startswith("age1") or not _usable(key):
            raise Rejected(RejectReason.BAD_PUBLIC_KEY)
    try:
        requested_at = parse_request_time(f["requested_at"], now)
    except ValueError as exc:
        raise Rejected(RejectReason.BAD_TIMESTAMP) from exc
    return KeyRequest(
        request_id=f["request_id"],
        action=action,
        user=user,
        public_key=key if action == "register" else None,
        requested_at=requested_at,
        row=row,
        digest=content_hash({**f, "action": action}, FIELDS),
    )


def _record(
    con: duckdb.DuckDBPyConnection,
    row: ManifestRow,
    req: KeyRequest | None,
    outcome: str,
    now: datetime,
) -> None:
    f = row.fields or {}
    insert_rows(
        con,
        "recipient_requests",
        [
            {
                "request_id": req.request_id if req and outcome == "applied" else row.ref,
                "content_hash": req.digest if req else None,
                "action": req.action if req else None,
                "user_id": f.get("user") or None,
                "requested_at": req.requested_at if req else None,
                "manifest": row.manifest,
                "line": row.line,
                "outcome": outcome,
                "processed_at": now,
            }
        ],
        ignore_existing=True,
    )


def _current(con: duckdb.DuckDBPyConnection, user: str) -> tuple[int, str] | None:
    found = con.execute(
        "SELECT version, public_key FROM recipient_keys WHERE user_id = ? AND retired_at IS NULL",
        [user],
    ).fetchone()
    return (int(found[0]), str(found[1])) if found else None


def _superseded(con: duckdb.DuckDBPyConnection, req: KeyRequest) -> bool:
    """Whether an applied request for the account is newer (by time, then request id, as
    rows in one manifest are ordered): the latest request wins whatever the arrival order,
    so a late old key never comes back, nor a key removed after it was registered."""
    latest = con.execute(
        "SELECT requested_at, request_id FROM recipient_requests"
        " WHERE user_id = ? AND outcome = 'applied' AND requested_at IS NOT NULL"
        " ORDER BY requested_at DESC, request_id DESC LIMIT 1",
        [req.user],
    ).fetchone()
    return latest is not None and (req.requested_at, req.request_id) < (latest[0], latest[1])


def _apply_one(con: duckdb.DuckDBPyConnection, req: KeyRequest, now: datetime) -> str:
    """Apply one valid request; returns its outcome."""
    if _superseded(con, req):
        return Rejected(RejectReason.SUPERSEDED).outcome
    current = _current(con, req.user)
    if req.action == "remove":
        if current is None:
            return "applied"  # no key in force already; recorded, so an older key stays out
        con.execute(
            "UPDATE recipient_keys SET retired_at = ? WHERE user_id = ? AND version = ?",
            [req.requested_at, req.user, current[0]],
        )
        action = "recipient_key_removed"
        detail: dict[str, Any] = {"version": current[0]}
    else:
        assert req.public_key is not None  # noqa: S101 - checked by _validate
        if current is not None and current[1] == req.public_key:
            return "applied"  # the key in force already: nothing changes
        version = (
            con.execute(
                "SELECT coalesce(max(version), 0) FROM recipient_keys WHERE user_id = ?",
                [req.user],
            ).fetchone()
            or (0,)
        )[0] + 1
        if current is not None:
            con.execute(
                "UPDATE recipient_keys SET retired_at = ? WHERE user_id = ? AND version = ?",
                [req.requested_at, req.user, current[0]],
            )
        insert_rows(
            con,
            "recipient_keys",
            [
                {
                    "user_id": req.user,
                    "version": version,
                    "public_key": req.public_key,
                    "request_id": req.request_id,
                    "registered_at": req.requested_at,
                }
            ],
        )
        action = "recipient_key_changed" if current else "recipient_key_registered"
        detail = {"version": version, "fingerprint": fingerprint(req.public_key)}
    audit(con, actor=req.user, action=action, subject=req.user, detail=detail, at=now)
    return "applied"


def apply_key_rows(catalog: Catalog, rows: list[ManifestRow], now: datetime) -> RowOutcomes:
    """Validate and apply recipients manifest rows in one transaction, oldest request first."""

    def work(con: duckdb.DuckDBPyConnection) -> RowOutcomes:
        result = RowOutcomes()
        valid: list[KeyRequest] = []
        for row in rows:
            try:
                valid.append(checked_row(_validate, row, now))
            except Rejected as exc:
                result.note(row, (row.fields or {}).get("request_id") or None, exc.outcome)
                _record(con, row, None, exc.outcome, now)
        known: dict[str, Any] = dict(
            con.execute(
                "SELECT request_id, content_hash FROM recipient_requests"
                " WHERE request_id IN (SELECT unnest(?::VARCHAR[]))",
                [[r.request_id for r in valid]],
            ).fetchall()
        )
        for req in sorted(valid, key=lambda r: (r.requested_at, r.request_id)):
            replay = replay_outcome(known, req.request_id, req.digest)
            if replay is not None:
                result.note(req.row, req.request_id, replay)
                if replay != "duplicate":
                    _record(con, req.row, req, replay, now)
                continue
            outcome = _apply_one(con, req, now)
            known[req.request_id] = req.digest
            result.note(req.row, req.request_id, outcome)
            _record(con, req.row, req, outcome, now)
        return result

    return catalog.write(work)


def recipient_keys(catalog: Catalog, user: str | None = None) -> Any:
    """The registry (every version, newest first), for one account or all."""
    where = "WHERE user_id = ?" if user else ""
    return catalog.query(
        f"SELECT user_id, version, public_key, registered_at, retired_at"  # noqa: S608
        f" FROM recipient_keys {where} ORDER BY user_id, version DESC",
        [user] if user else [],
    )
