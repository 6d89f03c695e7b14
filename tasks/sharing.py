"""Share, revoke and disclose requests; access readers; wrong-access incidents.

State model. Every share or revoke is an event in ``grant_events``. The
``grants`` row of a key (owner, grantee, study_uid) is derived from that
key's events alone: the latest by ``(requested_at, request_id)`` wins, and a
revoke of ``'*'`` counts as a revoke of every key of that owner and grantee.
So the result is the same whatever order manifests arrive in and however the
rows are split among them, a replay changes nothing, and a revoke older than
a later share does not cancel it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from dropvault.storage.catalog import Catalog, insert_rows
from dropvault.storage.errors import retry_transient
from dropvault.tasks.manifests import (
    FALSE,
    TRUE,
    ManifestRow,
    Rejected,
    RowOutcomes,
    archive_manifests,
    checked_row,
    content_hash,
    parse_request_time,
    parse_time,
    read_pending,
    replay_outcome,
)
from dropvault.tasks.phi import DELETED_PREFIX
from dropvault.tasks.reasons import RejectReason

SHARE_FIELDS = (
    "request_id",
    "action",
    "owner",
    "grantee",
    "study_uid",
    "expires_at",
    "requested_at",
    "purpose",
)
REQUIRED = ("request_id", "action", "owner", "grantee", "study_uid", "requested_at")
ACTIONS = ("share", "revoke", "disclose")

Key = tuple[str, str, str]  # owner, grantee, study_uid


@dataclass(frozen=True)
class ShareRequest:
    request_id: str
    action: str
    owner: str
    grantee: str
    study_uid: str
    requested_at: datetime
    expires_at: datetime | None
    purpose: str | None
    row: ManifestRow
    digest: str
    deliver: bool = False  # send the study's images to the grantee, encrypted to their key


@dataclass
class ShareResult(RowOutcomes):
    """Outcome of one application (or dry run)."""

    added: list[dict[str, Any]] = field(default_factory=list)  # grants now active, newly
    revoked: list[dict[str, Any]] = field(default_factory=list)  # grants no longer active
    disclosures: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "applied": self.applied,
            "duplicates": self.duplicates,
            "rejected": sum(self.rejected.values()),
            "rejected_by_reason": dict(sorted(self.rejected.items())),
            "grants_added": len(self.added),
            "grants_revoked": len(self.revoked),
            "disclosures": self.disclosures,
        }

    def _repr_html_(self) -> str:
        """A table for notebooks."""
        rows = [{"metric": k, "value": str(v)} for k, v in self.summary().items()]
        return pd.DataFrame(rows).to_html(index=False)


def validate_fields(row: ManifestRow, now: datetime) -> ShareRequest:
    """Syntax checks that need no catalog; raises :class:`Rejected`."""
    if row.fields is None:
        raise Rejected(row.error or RejectReason.MALFORMED)
    f = row.fields
    for name in REQUIRED:
        if not f.get(name):
            raise Rejected(RejectReason.MISSING_FIELD)
    action = f["action"].lower()
    if action not in ACTIONS:
        raise Rejected(RejectReason.UNKNOWN_ACTION)
    if action == "disclose" and not f.get("purpose"):
        raise Rejected(RejectReason.MISSING_FIELD)
    try:
        requested_at = parse_request_time(f["requested_at"], now)
        expires_at = parse_time(f["expires_at"]) if f.get("expires_at") else None
    except ValueError as exc:
        raise Rejected(RejectReason.BAD_TIMESTAMP) from exc
    if expires_at is not None and expires_at <= requested_at:
        raise Rejected(RejectReason.BAD_TIMESTAMP)
    if f["grantee"] == f["owner"]:
        raise Rejected(RejectReason.GRANTEE_IS_OWNER)
    deliver = (f.get("deliver") or "").lower()
    if deliver not in TRUE | FALSE or (deliver in TRUE and action != "share"):
        raise Rejected(RejectReason.BAD_DELIVER)
    return ShareRequest(
        request_id=f["request_id"],
        action=action,
        owner=f["owner"],
        grantee=f["grantee"],
        study_uid=f["study_uid"],
        requested_at=requested_at,
        expires_at=expires_at,
        purpose=f.get("purpose") or None,
        row=row,
        # deliver joins the digest only when asked: rows recorded before it existed keep
        # theirs, so their replays are still duplicates.
        digest=content_hash(f, SHARE_FIELDS + (("deliver",) if deliver in TRUE else ())),
        deliver=deliver in TRUE,
    )


# -- grants derived from events ---------------------------------------------------------


def _grants_of(con: duckdb.DuckDBPyConnection, pairs: Iterable[tuple[str, str]]) -> pd.DataFrame:
    pairs_df = pd.DataFrame(list(pairs), columns=["owner", "grantee"]).drop_duplicates()
    con.register("_pairs", pairs_df)
    try:
        return con.execute("SELECT g.* FROM grants g JOIN _pairs p USING (owner, grantee)").df()
    finally:
        con.unregister("_pairs")


def recompute_grants(con: duckdb.DuckDBPyConnection, pairs: set[tuple[str, str]]) -> None:
    """Rebuild the grants of these (owner, grantee) pairs from their events."""
    if not pairs:
        return
    pairs_df = pd.DataFrame(sorted(pairs), columns=["owner", "grantee"])
    con.register("_pairs", pairs_df)
    try:
        events = con.execute(
            "SELECT e.* FROM grant_events e JOIN _pairs p USING (owner, grantee)"
            " ORDER BY requested_at, event_id"
        ).fetchall()
        cols = [d[0] for d in con.description or []]
        con.execute(
            "DELETE FROM grants WHERE (owner, grantee) IN (SELECT (owner, grantee) FROM _pairs)"
        )
    finally:
        con.unregister("_pairs")
    by_pair: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for values in events:
        ev = dict(zip(cols, values, strict=True))
        by_pair.setdefault((ev["owner"], ev["grantee"]), []).append(ev)
    rows = []
    for (owner, grantee), evs in by_pair.items():
        studies = {e["study_uid"] for e in evs if e["action"] == "share"}
        for study in studies:
            relevant = [
                e
                for e in evs
                if e["study_uid"] == study or (e["study_uid"] == "*" and e["action"] == "revoke")
            ]  # already in (requested_at, event_id) order
            last = relevant[-1]
            shares = [e for e in relevant if e["action"] == "share"]
            share = last if last["action"] == "share" else shares[-1]
            revoked = last["action"] == "revoke"
            rows.append(
                {
                    "owner": owner,
                    "grantee": grantee,
                    "study_uid": study,
                    "grant_request_id": share["event_id"],
                    "granted_at": share["requested_at"],
                    "expires_at": share["expires_at"],
                    "revoked_at": last["requested_at"] if revoked else None,
                    "revoked_by": last["actor"] if revoked else None,
                    "revoke_reason": last["reason"] if revoked else None,
                    "revoke_request_id": last["event_id"] if revoked else None,
                }
            )
    insert_rows(con, "grants", rows)


def _active(df: pd.DataFrame, now: datetime) -> set[Key]:
    if df.empty:
        return set()
    live = df[df["revoked_at"].isna() & (df["expires_at"].isna() | (df["expires_at"] > now))]
    return {
        (str(o), str(g), str(s))
        for o, g, s in zip(live["owner"], live["grantee"], live["study_uid"], strict=True)
    }


@dataclass(frozen=True)
class GrantEvent:
    """A row of ``grant_events`` (append-only): every share and revoke, from a manifest, a
    deletion or an incident, is built here and nowhere else."""

    event_id: str
    action: str  # share | revoke
    owner: str
    grantee: str
    study_uid: str
    requested_at: datetime
    expires_at: datetime | None
    actor: str
    reason: str  # manifest | deleted | incident
    recorded_at: datetime

    def row(self) -> dict[str, Any]:
        return asdict(self)


def insert_grant_events(con: duckdb.DuckDBPyConnection, events: list[GrantEvent]) -> None:
    insert_rows(con, "grant_events", [e.row() for e in events], ignore_existing=True)


def apply_requests(
    con: duckdb.DuckDBPyConnection, rows: list[ManifestRow], now: datetime
) -> ShareResult:
    """Validate and apply manifest rows inside the caller's transaction: check each row's
    fields, decide each valid one against the catalog, then apply those that pass."""
    result = ShareResult()
    valid: list[ShareRequest] = []
    for row in rows:
        try:
            valid.append(checked_row(validate_fields, row, now))
        except Rejected as exc:
            rid = (row.fields or {}).get("request_id") or None
            result.note(row, rid, exc.outcome)
            _record(con, row, None, exc.outcome, now)
    _apply(con, _decide(con, valid, now, result), now, result)
    return result


def _decide(
    con: duckdb.DuckDBPyConnection, valid: list[ShareRequest], now: datetime, result: ShareResult
) -> list[ShareRequest]:
    """Each valid request in ``requested_at`` order: a duplicate, refused (a reused id, an
    unknown study, not the owner's), or to apply. Every outcome is recorded."""
    known = dict(
        con.execute(
            "SELECT request_id, content_hash FROM share_requests"
            " WHERE request_id IN (SELECT unnest(?::VARCHAR[]))",
            [[r.request_id for r in valid]],
        ).fetchall()
    )
    owners = dict(
        con.execute(
            "SELECT study_uid, owner FROM studies WHERE study_uid IN (SELECT unnest(?::VARCHAR[]))"
            " AND status = 'active'",
            [sorted({r.study_uid for r in valid if r.study_uid != "*"})],
        ).fetchall()
    )
    todo: list[ShareRequest] = []
    for req in sorted(valid, key=lambda r: (r.requested_at, r.request_id)):
        replay = replay_outcome(known, req.request_id, req.digest)
        if replay is not None:
            result.note(req.row, req.request_id, replay)
            if replay != "duplicate":
                _record(con, req.row, req, replay, now)
            continue
        reject = None
        if req.study_uid.startswith(DELETED_PREFIX):
            reject = RejectReason.STUDY_DELETED
        elif req.study_uid != "*" and req.study_uid not in owners:
            reject = RejectReason.UNKNOWN_STUDY
        elif req.study_uid != "*" and owners[req.study_uid] != req.owner:
            reject = RejectReason.NOT_OWNER
        outcome = Rejected(reject).outcome if reject else "applied"
        known[req.request_id] = req.digest
        result.note(req.row, req.request_id, outcome)
        _record(con, req.row, req, outcome, now)
        if not reject:
            todo.append(req)
    return todo


def _apply(
    con: duckdb.DuckDBPyConnection, todo: list[ShareRequest], now: datetime, result: ShareResult
) -> None:
    """Append the events and disclosures, recompute the grants, and report what changed."""
    pairs = {(r.owner, r.grantee) for r in todo if r.action != "disclose"}
    before = _active(_grants_of(con, pairs), now) if pairs else set()
    events = [
        GrantEvent(
            event_id=r.request_id,
            action=r.action,
            owner=r.owner,
            grantee=r.grantee,
            study_uid=r.study_uid,
            requested_at=r.requested_at,
            expires_at=r.expires_at,
            actor=r.owner,
            reason="manifest",
            recorded_at=now,
        )
        for r in todo
        if r.action != "disclose"
    ]
    insert_rows(con, "grant_events", [e.row() for e in events])
    insert_rows(con, "delivery_requests", [{"request_id": r.request_id} for r in todo if r.deliver])
    disclosures = [
        {
            "disclosure_id": r.request_id,
            "owner": r.owner,
            "recipient": r.grantee,
            "study_uid": r.study_uid,
            "description": "all studies of the owner" if r.study_uid == "*" else "one study",
            "purpose": r.purpose,
            "disclosed_at": r.requested_at,
            "recorded_at": now,
        }
        for r in todo
        if r.action == "disclose"
    ]
    insert_rows(con, "disclosures", disclosures)
    result.disclosures = len(disclosures)
    recompute_grants(con, pairs)
    after = _active(_grants_of(con, pairs), now) if pairs else set()
    result.added = [
        dict(zip(("owner", "grantee", "study_uid"), k, strict=True)) for k in sorted(after - before)
    ]
    result.revoked = [
        dict(zip(("owner", "grantee", "study_uid"), k, strict=True)) for k in sorted(before - after)
    ]


def _record(
    con: duckdb.DuckDBPyConnection,
    row: ManifestRow,
    req: ShareRequest | None,
    outcome: str,
    now: datetime,
) -> None:
    f = row.fields or {}
    insert_rows(
        con,
        "share_requests",
        [
            {
                "request_id": req.request_id if req and outcome == "applied" else f"{row.ref}",
                "content_hash": req.digest if req else None,
                "action": (f.get("action") or None),
                "owner": f.get("owner") or None,
                "grantee": f.get("grantee") or None,
                "study_uid": f.get("study_uid") or None,
                "requested_at": req.requested_at if req else None,
                "expires_at": req.expires_at if req else None,
                "purpose": f.get("purpose") or None,
                "manifest": row.manifest,
                "line": row.line,
                "outcome": outcome,
                "processed_at": now,
            }
        ],
        ignore_existing=True,
    )


def apply_share_rows(
    catalog: Catalog, rows: list[ManifestRow], now: datetime, dry_run: bool = False
) -> ShareResult:
    """Apply rows in one transaction; with ``dry_run`` roll it back and only report the diff."""
    run = catalog.simulate if dry_run else catalog.write
    return run(lambda con: apply_requests(con, rows, now))


read_pending_task = task(
    name="read-manifests",
    retries=3,
    retry_condition_fn=retry_transient,
    retry_delay_seconds=[1, 2, 5],
    cache_policy=NO_CACHE,
)(read_pending)
archive_manifests_task = task(
    name="archive-manifests",
    retries=3,
    retry_condition_fn=retry_transient,
    retry_delay_seconds=[1, 2, 5],
    cache_policy=NO_CACHE,
)(archive_manifests)
apply_share_rows_task = task(
    name="apply-share-rows",
    retries=2,
    retry_condition_fn=retry_transient,
    retry_delay_seconds=[1, 5],
    cache_policy=NO_CACHE,
)(apply_share_rows)


# -- readers ---------------------------------------------------------------------------


def access_list(catalog: Catalog, owner: str) -> pd.DataFrame:
    """Everyone the owner has shared with: one row a grant, with status active|revoked|expired."""
    return catalog.query(
        "SELECT owner, grantee, scope, study_uid, granted_at, expires_at, status"
        " FROM access_list WHERE owner = ? ORDER BY grantee, study_uid",
        [owner],
    )


def who_can_access(catalog: Catalog, study_uid: str) -> pd.DataFrame:
    """Who can access a study now: its owner and every active grant covering it."""
    return catalog.query(
        "SELECT study_uid, user_id, via, expires_at FROM study_access WHERE study_uid = ?"
        " ORDER BY via DESC, user_id",
        [study_uid],
    )


def study_exists(catalog: Catalog, study_uid: str) -> bool:
    """The catalog holds this study (in any state but deleted)."""
    df = catalog.query("SELECT count(*) AS n FROM studies WHERE study_uid = ?", [study_uid])
    return bool(df["n"].iloc[0])


def can_access(catalog: Catalog, user: str, study_uid: str) -> bool:
    df = catalog.query(
        "SELECT count(*) AS n FROM study_access WHERE study_uid = ? AND user_id = ?",
        [study_uid, user],
    )
    return bool(df["n"].iloc[0])


def disclosures_for(catalog: Catalog, owner: str, since: datetime | None = None) -> pd.DataFrame:
    """The accounting of disclosures for an owner over the last 6 years (or since ``since``)."""
    since = since or datetime.now(UTC) - timedelta(days=6 * 365 + 2)
    return catalog.query(
        "SELECT disclosed_at, recipient, study_uid, description, purpose FROM disclosures"
        " WHERE owner = ? AND disclosed_at >= ? ORDER BY disclosed_at",
        [owner, since],
    )


# -- incidents -------------------------------------------------------------------------
