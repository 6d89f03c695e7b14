"""Deletion requests and the sweep that carries them out (promise P3).

Per study, in an order that a killed sweep can resume from:

1. one catalog transaction: revoke the study's grants (``grant_events`` reason
   ``deleted``), mark the study ``deleting`` (or ``archived``) so it leaves every
   share, and write its tombstone, keyed by a keyed hash of the study UID, so an
   ingest still in flight cannot bring it back;
2. with ``keep_archive``: move its objects to ``{archive}`` (still encrypted,
   still exportable by the owner) and stop there;
3. destroy every record key its objects use (crypto-shredding: any copy,
   backup or old version is unreadable from now on);
4. delete every object, every version, in the vault and the quarantine;
5. one catalog transaction: delete its ``instances``, ``objects``, ``quarantine``
   and ``studies`` rows, and replace its UID by the tombstone key in the grant
   history and disclosures (which the law keeps);
6. verify: no version of any former object is listed, no key unwraps.

After the sweep the catalog is compacted (CHECKPOINT, and a rewrite of the file
if a byte scan still finds a deleted UID).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from storage.catalog import Catalog, insert_rows
from storage.home import Home
from storage.keystore import KeyDestroyedError, UnknownKeyError
from storage.locations import Location
from tasks.ingest import study_key
from tasks.manifests import ManifestRow, content_hash, parse_time
from tasks.sharing import recompute_grants

DELETION_FIELDS = ("request_id", "owner", "study_uid", "requested_at", "keep_archive")
DUE_WITHIN = timedelta(hours=24)
TRUE = {"true", "1", "yes", "y"}
FALSE = {"false", "0", "no", "n", ""}

# Fault-injection points for the resume tests: name -> callable.
FAULTS: dict[str, Any] = {}


def _fault(point: str) -> None:
    hook = FAULTS.get(point)
    if hook is not None:
        hook()


@dataclass
class IntakeResult:
    outcomes: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    accepted: int = 0
    duplicates: int = 0
    rejected: dict[str, int] = field(default_factory=dict)

    def note(self, row: ManifestRow, request_id: str | None, outcome: str) -> None:
        self.outcomes.setdefault(row.manifest, []).append(
            {"line": row.line, "request_id": request_id, "outcome": outcome}
        )
        if outcome == "applied":
            self.accepted += 1
        elif outcome == "duplicate":
            self.duplicates += 1
        else:
            reason = outcome.removeprefix("rejected:")
            self.rejected[reason] = self.rejected.get(reason, 0) + 1


def _validate(row: ManifestRow) -> dict[str, Any]:
    if row.fields is None:
        raise ValueError(row.error or "malformed")
    f = row.fields
    for name in ("request_id", "owner", "study_uid", "requested_at"):
        if not f.get(name):
            raise ValueError("missing_field")
    try:
        requested_at = parse_time(f["requested_at"])
    except ValueError as exc:
        raise ValueError("bad_timestamp") from exc
    keep = (f.get("keep_archive") or "").lower()
    if keep not in TRUE | FALSE:
        raise ValueError("bad_keep_archive")
    return {
        "request_id": f["request_id"],
        "owner": f["owner"],
        "study_uid": f["study_uid"],
        "requested_at": requested_at,
        "keep_archive": keep in TRUE,
        "content_hash": content_hash(f, DELETION_FIELDS),
    }


def register_requests(
    con: duckdb.DuckDBPyConnection, rows: list[ManifestRow], now: datetime
) -> IntakeResult:
    """Validate deletion rows and record them as pending (or rejected) requests."""
    result = IntakeResult()
    for row in rows:
        base = {"manifest": row.manifest, "line": row.line, "received_at": now}
        try:
            req = _validate(row)
        except ValueError as exc:
            reason = str(exc)
            rid = (row.fields or {}).get("request_id") or None
            result.note(row, rid, f"rejected:{reason}")
            _insert(
                con,
                {
                    **base,
                    "request_id": row.ref,
                    "status": "rejected",
                    "outcome": f"rejected:{reason}",
                },
            )
            continue
        known = con.execute(
            "SELECT content_hash FROM deletion_requests WHERE request_id = ?", [req["request_id"]]
        ).fetchone()
        if known is not None:
            outcome = (
                "duplicate"
                if known[0] == req["content_hash"]
                else ("rejected:duplicate_request_id")
            )
            result.note(row, req["request_id"], outcome)
            if outcome != "duplicate":
                _insert(
                    con, {**base, "request_id": row.ref, "status": "rejected", "outcome": outcome}
                )
            continue
        if req["study_uid"] == "*":
            found = con.execute(
                "SELECT count(*) FROM studies WHERE owner = ?", [req["owner"]]
            ).fetchone()
            reason = "" if found and found[0] else "unknown_owner"
        else:
            owner = con.execute(
                "SELECT owner FROM studies WHERE study_uid = ?", [req["study_uid"]]
            ).fetchone()
            reason = (
                "unknown_study"
                if owner is None
                else ("" if owner[0] == req["owner"] else "not_owner")
            )
        outcome = f"rejected:{reason}" if reason else "applied"
        result.note(row, req["request_id"], outcome)
        _insert(
            con,
            {
                **base,
                **req,
                "request_id": req["request_id"] if not reason else row.ref,
                "due_at": req["requested_at"] + DUE_WITHIN,
                "status": "rejected" if reason else "pending",
                "outcome": outcome,
            },
        )
    return result


def _insert(con: duckdb.DuckDBPyConnection, row: dict[str, Any]) -> None:
    insert_rows(con, "deletion_requests", [row], ignore_existing=True)


# -- the sweep ----------------------------------------------------------------------------


@dataclass
class StudyOutcome:
    request_id: str
    study_key: str
    outcome: str  # deleted | archived
    instances: int = 0
    objects: int = 0
    versions: int = 0
    keys: int = 0
    verified: bool = False
    study_uid: str = field(default="", repr=False)  # kept in memory only, for the byte scan


def pending_requests(catalog: Catalog) -> pd.DataFrame:
    return catalog.query(
        "SELECT request_id, owner, study_uid, keep_archive, requested_at, due_at"
        " FROM deletion_requests WHERE status = 'pending' ORDER BY due_at, request_id"
    )


def _studies_of(con: duckdb.DuckDBPyConnection, owner: str, study_uid: str) -> list[str]:
    if study_uid == "*":
        rows = con.execute(
            "SELECT study_uid FROM studies WHERE owner = ? AND status IN ('active', 'deleting')"
            " ORDER BY 1",
            [owner],
        ).fetchall()
    else:
        rows = con.execute(
            "SELECT study_uid FROM studies WHERE study_uid = ? AND owner = ?"
            " AND status IN ('active', 'deleting')",
            [study_uid, owner],
        ).fetchall()
    return [r[0] for r in rows]


def _location_for(home: Home, url: str) -> Location:
    for loc in (home.vault, home.quarantine, home.archive):
        if loc.url == url:
            return loc
    return Location(url)


def delete_study(
    home: Home, request_id: str, owner: str, study_uid: str, keep_archive: bool, now: datetime
) -> StudyOutcome:
    key = study_key(home.pepper, study_uid)
    outcome = StudyOutcome(
        request_id, key, "archived" if keep_archive else "deleted", study_uid=study_uid
    )

    # 1. Revoke, mark, tombstone: one transaction.
    def start(con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
        grants = con.execute(
            "SELECT owner, grantee, study_uid FROM grants WHERE owner = ? AND study_uid = ?"
            " AND revoked_at IS NULL",
            [owner, study_uid],
        ).fetchall()
        insert_rows(
            con,
            "grant_events",
            [
                {
                    "event_id": f"deletion:{request_id}:{key}:{i}",
                    "action": "revoke",
                    "owner": o,
                    "grantee": g,
                    "study_uid": s,
                    "requested_at": now,
                    "expires_at": None,
                    "actor": "deletion",
                    "reason": "deleted",
                    "recorded_at": now,
                }
                for i, (o, g, s) in enumerate(grants)
            ],
            ignore_existing=True,
        )
        recompute_grants(con, {(o, g) for o, g, _ in grants})
        con.execute(
            "UPDATE studies SET status = ? WHERE study_uid = ?",
            ["archived" if keep_archive else "deleting", study_uid],
        )
        if not keep_archive:
            insert_rows(
                con,
                "tombstones",
                [
                    {
                        "study_key": key,
                        "request_id": request_id,
                        "outcome": "deleted",
                        "created_at": now,
                    }
                ],
                ignore_existing=True,
            )
        return con.execute(
            "SELECT o.object_id, o.kind, o.location_url, o.name, o.record_key_id FROM objects o"
            " WHERE o.object_id IN (SELECT object_id FROM instances WHERE study_uid = ?)"
            "    OR o.object_id IN (SELECT object_id FROM quarantine WHERE study_uid = ?)",
            [study_uid, study_uid],
        ).df()

    objects = home.catalog.write(start)
    instances = home.catalog.query(
        "SELECT count(*) AS n FROM instances WHERE study_uid = ?", [study_uid]
    )["n"].iloc[0]
    outcome.instances = int(instances)
    outcome.objects = len(objects)
    _fault("after_mark")

    # 2. Archive election: move, repoint, done.
    if keep_archive:
        moved = []
        for obj in objects.itertuples():
            source = _location_for(home, str(obj.location_url))
            if source.url == home.archive.url:
                continue
            if source.exists(str(obj.name)):
                source.move(str(obj.name), home.archive, str(obj.name))
            moved.append(obj.object_id)
        home.catalog.write(
            lambda con: con.execute(
                "UPDATE objects SET location_url = ? WHERE list_contains(?, object_id)",
                [home.archive.url, moved],
            )
        )
        outcome.verified = all(home.archive.exists(str(n)) for n in objects["name"])
        return outcome

    # 3. Crypto-shred.
    study_keys = home.catalog.query(
        "SELECT record_key_id FROM studies WHERE study_uid = ?", [study_uid]
    )["record_key_id"].tolist()
    key_ids = sorted(set(objects["record_key_id"]) | set(study_keys))
    outcome.keys = home.keystore.destroy(key_ids)
    _fault("after_shred")

    # 4. Delete every object and every version.
    for obj in objects.itertuples():
        location = _location_for(home, str(obj.location_url))
        outcome.versions += location.delete(str(obj.name))
        if obj.kind == "quarantine":
            location.delete(str(obj.name)[: -len(".dvlt")] + ".json")
    _fault("after_objects")

    # 5. Delete the rows; keep legal history under the tombstone key.
    def finish(con: duckdb.DuckDBPyConnection) -> None:
        ids = list(objects["object_id"])
        sops = [
            r[0]
            for r in con.execute(
                "SELECT sop_instance_uid FROM instances WHERE study_uid = ?", [study_uid]
            ).fetchall()
        ]
        con.execute(
            "UPDATE audit_log SET subject = ? WHERE list_contains(?, subject)",
            [f"deleted:{key}", sops],
        )
        con.execute("DELETE FROM instances WHERE study_uid = ?", [study_uid])
        con.execute("DELETE FROM quarantine WHERE study_uid = ?", [study_uid])
        con.execute("DELETE FROM objects WHERE list_contains(?, object_id)", [ids])
        con.execute("DELETE FROM studies WHERE study_uid = ?", [study_uid])
        for table in (
            "grants",
            "grant_events",
            "disclosures",
            "share_requests",
            "deletion_requests",
        ):
            con.execute(
                f"UPDATE {table} SET study_uid = ? WHERE study_uid = ?",  # noqa: S608 - our tables
                [f"deleted:{key}", study_uid],
            )
        con.execute(
            "UPDATE tombstones SET completed_at = ?, instances = ?, objects = ?, versions = ?,"
            " keys = ? WHERE study_key = ?",
            [now, outcome.instances, outcome.objects, outcome.versions, outcome.keys, key],
        )
        con.execute(
            "INSERT INTO audit_log VALUES (?, ?, 'deletion', 'delete_study', ?, ?)",
            [
                uuid.uuid4().hex,
                now,
                key,
                f'{{"request_id": "{request_id}", "objects": {outcome.objects}}}',
            ],
        )

    home.catalog.write(finish)

    # 6. Verify.
    leftovers = 0
    for obj in objects.itertuples():
        location = _location_for(home, str(obj.location_url))
        if location.protocol in ("s3", "s3a") and location.versioned:
            leftovers += len(location.versions(str(obj.name)))
        elif location.exists(str(obj.name)):
            leftovers += 1
    unwrappable = 0
    for key_id in key_ids:
        try:
            home.keystore.unwrap(key_id)
            unwrappable += 1
        except (KeyDestroyedError, UnknownKeyError):
            pass
    outcome.verified = leftovers == 0 and unwrappable == 0
    return outcome


@dataclass
class SweepResult:
    requests_done: int = 0
    studies: list[StudyOutcome] = field(default_factory=list)
    intake: IntakeResult = field(default_factory=IntakeResult)
    compacted: str = ""
    sla: dict[str, int] = field(default_factory=dict)
    planned: list[dict[str, Any]] = field(default_factory=list)  # dry run only

    def summary(self) -> dict[str, Any]:
        return {
            "requests_received": self.intake.accepted,
            "requests_rejected": sum(self.intake.rejected.values()),
            "requests_completed": self.requests_done,
            "studies_deleted": sum(1 for s in self.studies if s.outcome == "deleted"),
            "studies_archived": sum(1 for s in self.studies if s.outcome == "archived"),
            "objects": sum(s.objects for s in self.studies),
            "all_verified": all(s.verified for s in self.studies),
            "catalog_compaction": self.compacted,
            **{f"sla_{k}": v for k, v in sorted(self.sla.items())},
        }


def sweep_requests(home: Home, requests: pd.DataFrame, now: datetime) -> SweepResult:
    """Carry out pending requests (a batch); each is marked completed once all its studies are."""
    result = SweepResult()
    for req in requests.itertuples():
        owner, scope, rid = str(req.owner), str(req.study_uid), str(req.request_id)

        def studies_of(con: duckdb.DuckDBPyConnection, o: str = owner, s: str = scope) -> list[str]:
            return _studies_of(con, o, s)

        studies = home.catalog.write(studies_of)
        done = [delete_study(home, rid, owner, s, bool(req.keep_archive), now) for s in studies]
        result.studies += done
        finished = datetime.now(UTC)
        values = [
            finished,
            finished if all(d.verified for d in done) else None,
            len(done),
            sum(x.objects for x in done),
            rid,
        ]

        def complete(con: duckdb.DuckDBPyConnection, v: list[Any] = values) -> None:
            con.execute(
                "UPDATE deletion_requests SET status = 'completed', completed_at = ?,"
                " verified_at = ?, studies = ?, objects = ? WHERE request_id = ?",
                v,
            )

        home.catalog.write(complete)
        result.requests_done += 1
    return result


def compact_catalog(catalog: Catalog, deleted_uids: list[str]) -> str:
    """Make deleted rows' bytes leave the DuckDB file: CHECKPOINT, scan, rewrite if needed."""
    if not deleted_uids:
        return "nothing deleted"
    catalog.checkpoint()
    if not _file_holds(catalog, deleted_uids):
        return "checkpoint"
    catalog.rewrite()
    if _file_holds(catalog, deleted_uids):
        raise RuntimeError("deleted identifiers are still in the catalog file after a rewrite")
    return "rewrite"


def _file_holds(catalog: Catalog, needles: list[str]) -> bool:
    paths = [catalog.path, catalog.path.with_name(catalog.path.name + ".wal")]
    encoded = [n.encode() for n in needles]
    for path in paths:
        if path.exists():
            data = path.read_bytes()
            if any(n in data for n in encoded):
                return True
    return False


def deletion_sla(catalog: Catalog, at_risk_hours: float = 6.0) -> pd.DataFrame:
    """Requests with their SLA state: pending, at_risk, completed or breached."""
    df = catalog.query(
        "SELECT request_id, owner, study_uid, keep_archive, requested_at, due_at, completed_at,"
        " verified_at, sla_state FROM deletion_sla ORDER BY due_at, request_id"
    )
    if df.empty:
        return df
    now = pd.Timestamp.now(tz="UTC")
    pending = df["completed_at"].isna() & (df["due_at"] >= now)
    risky = pending & (df["due_at"] - now <= pd.Timedelta(hours=at_risk_hours))
    df.loc[pending, "sla_state"] = "pending"
    df.loc[risky, "sla_state"] = "at_risk"
    return df


def plan_requests(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """What a sweep would do for every pending request, without doing it (dry run)."""
    plan = []
    pending = con.execute(
        "SELECT request_id, owner, study_uid, keep_archive, due_at FROM deletion_requests"
        " WHERE status = 'pending' ORDER BY due_at, request_id"
    ).fetchall()
    for request_id, owner, scope, keep, due_at in pending:
        found = con.execute(
            "SELECT count(DISTINCT s.study_uid), count(i.sop_instance_uid) FROM studies s"
            " LEFT JOIN instances i USING (study_uid)"
            " WHERE s.owner = ? AND (? = '*' OR s.study_uid = ?)"
            " AND s.status IN ('active', 'deleting')",
            [owner, scope, scope],
        ).fetchone()
        studies, instances = found if found else (0, 0)
        plan.append(
            {
                "request_id": request_id,
                "action": "archive" if keep else "delete",
                "studies": studies,
                "instances": instances,
                "due_at": due_at,
            }
        )
    return plan


def dry_run_sweep(catalog: Catalog, rows: list[ManifestRow], now: datetime) -> SweepResult:
    """Register the rows and plan the sweep in a transaction that is rolled back."""

    def work(con: duckdb.DuckDBPyConnection) -> SweepResult:
        intake = register_requests(con, rows, now)
        return SweepResult(intake=intake, planned=plan_requests(con))

    return catalog.simulate(work)


def register_deletion_rows(
    catalog: Catalog, rows: list[ManifestRow], now: datetime
) -> IntakeResult:
    """Record the rows as requests in one transaction."""
    return catalog.write(lambda con: register_requests(con, rows, now))


register_requests_task = task(
    name="register-deletion-requests",
    retries=2,
    retry_delay_seconds=[1, 5],
    cache_policy=NO_CACHE,
)(register_deletion_rows)
sweep_requests_task = task(
    name="sweep-requests", retries=2, retry_delay_seconds=[1, 5], cache_policy=NO_CACHE
)(sweep_requests)
compact_catalog_task = task(
    name="compact-catalog", retries=2, retry_delay_seconds=[1, 5], cache_policy=NO_CACHE
)(compact_catalog)
