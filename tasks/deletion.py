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

import json
import random
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import pandas as pd
from cryptography.exceptions import InvalidTag
from prefect import task
from prefect.cache_policies import NO_CACHE

from dropvault.storage.catalog import Catalog, column_types, insert_rows, key_columns
from dropvault.storage.errors import TerminalError, retry_transient
from dropvault.storage.home import Home
from dropvault.storage.identifiers import columns_of_kind
from dropvault.storage.keystore import KeyError_
from dropvault.tasks.audit import audit
from dropvault.tasks.delivery import withdraw_studies
from dropvault.tasks.manifests import (
    FALSE,
    TRUE,
    ManifestRow,
    Rejected,
    RowOutcomes,
    checked_row,
    content_hash,
    parse_request_time,
    redact_manifests,
)
from dropvault.tasks.phi import (
    DELETED_PREFIX,
    keyed_hash,
    open_fields,
    redact,
    redact_quotes,
    seal_fields,
    study_key,
    study_quotes,
    tombstone_ref,
)
from dropvault.tasks.reasons import RejectReason
from dropvault.tasks.receipts import delete_receipts
from dropvault.tasks.sharing import GrantEvent, insert_grant_events, recompute_grants

DELETION_FIELDS = ("request_id", "owner", "study_uid", "requested_at", "keep_archive")
DUE_WITHIN = timedelta(hours=24)

# Fault-injection points for the resume tests: name -> callable.
FAULTS: dict[str, Any] = {}


def _fault(point: str) -> None:
    hook = FAULTS.get(point)
    if hook is not None:
        hook()


class IntakeResult(RowOutcomes):
    """Outcomes of the deletion rows taken in by one sweep."""


def _validate(row: ManifestRow, now: datetime) -> dict[str, Any]:
    if row.fields is None:
        raise Rejected(row.error or RejectReason.MALFORMED)
    f = row.fields
    for name in ("request_id", "owner", "study_uid", "requested_at"):
        if not f.get(name):
            raise Rejected(RejectReason.MISSING_FIELD)
    try:
        requested_at = parse_request_time(f["requested_at"], now)
    except ValueError as exc:
        raise Rejected(RejectReason.BAD_TIMESTAMP) from exc
    keep = (f.get("keep_archive") or "").lower()
    if keep not in TRUE | FALSE:
        raise Rejected(RejectReason.BAD_KEEP_ARCHIVE)
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
    """Validate deletion rows and record them as pending (or rejected) requests.

    Look-ups and inserts are done in bulk: a sweep may take 10,000 requests at once.
    """
    result = IntakeResult()
    valid: list[tuple[ManifestRow, dict[str, Any]]] = []
    records: list[dict[str, Any]] = []
    for row in rows:
        base = {"manifest": row.manifest, "line": row.line, "received_at": now}
        try:
            valid.append((row, checked_row(_validate, row, now)))
        except Rejected as exc:
            rid = (row.fields or {}).get("request_id") or None
            result.note(row, rid, exc.outcome)
            records.append(
                {**base, "request_id": row.ref, "status": "rejected", "outcome": exc.outcome}
            )
    known = dict(
        con.execute(
            "SELECT request_id, content_hash FROM deletion_requests"
            " WHERE request_id IN (SELECT unnest(?::VARCHAR[]))",
            [[req["request_id"] for _, req in valid]],
        ).fetchall()
    )
    study_owner = dict(
        con.execute(
            "SELECT study_uid, owner FROM studies WHERE study_uid IN (SELECT unnest(?::VARCHAR[]))",
            [[req["study_uid"] for _, req in valid]],
        ).fetchall()
    )
    owners_with_studies = {
        r[0]
        for r in con.execute(
            "SELECT DISTINCT owner FROM studies WHERE owner IN (SELECT unnest(?::VARCHAR[]))",
            [[req["owner"] for _, req in valid if req["study_uid"] == "*"]],
        ).fetchall()
    }
    for row, req in valid:
        base = {"manifest": row.manifest, "line": row.line, "received_at": now}
        if req["request_id"] in known:
            same = known[req["request_id"]] == req["content_hash"]
            outcome = "duplicate" if same else Rejected(RejectReason.DUPLICATE_REQUEST_ID).outcome
            result.note(row, req["request_id"], outcome)
            if not same:
                records.append(
                    {**base, "request_id": row.ref, "status": "rejected", "outcome": outcome}
                )
            continue
        if req["study_uid"] == "*":
            reason = None if req["owner"] in owners_with_studies else RejectReason.UNKNOWN_OWNER
        elif req["study_uid"].startswith(DELETED_PREFIX):
            reason = RejectReason.STUDY_DELETED
        elif req["study_uid"] not in study_owner:
            reason = RejectReason.UNKNOWN_STUDY
        else:
            reason = (
                None if study_owner[req["study_uid"]] == req["owner"] else RejectReason.NOT_OWNER
            )
        outcome = Rejected(reason).outcome if reason else "applied"
        result.note(row, req["request_id"], outcome)
        known[req["request_id"]] = req["content_hash"]
        records.append(
            {
                **base,
                **req,
                "request_id": req["request_id"] if not reason else row.ref,
                "due_at": req["requested_at"] + DUE_WITHIN,
                "status": "rejected" if reason else "pending",
                "outcome": outcome,
            }
        )
    insert_rows(con, "deletion_requests", records, ignore_existing=True)
    return result


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
        "SELECT request_id, owner, study_uid, keep_archive, requested_at, due_at, status"
        " FROM deletion_requests WHERE status IN ('pending', 'failed')"
        " ORDER BY due_at, request_id"
    )


@dataclass(frozen=True)
class StudyWork:
    request_id: str
    owner: str
    study_uid: str
    keep_archive: bool


class _Sweep:
    """One batch of studies through the named stages of a deletion, in an order a killed
    sweep resumes from (README, "Deletion"): :meth:`mark` (revoke, mark, tombstone, record
    what must go), :meth:`archive` (the owner's election), :meth:`shred` (destroy the record
    keys), :meth:`delete_objects` (every version), :meth:`redact_files` (processed
    manifests and incident reports), :meth:`delete_rows` (keep legal history under the
    tombstone key), :meth:`verify`. Each stage is one transaction or one call."""

    def __init__(self, home: Home, work: list[StudyWork], now: datetime) -> None:
        self.home = home
        self.now = now
        self.keys = {w.study_uid: study_key(home.pepper, w.study_uid) for w in work}
        self.uids = [w.study_uid for w in work]
        self.by_uid = {w.study_uid: w for w in work}
        self.outcomes = {
            w.study_uid: StudyOutcome(
                w.request_id,
                self.keys[w.study_uid],
                "archived" if w.keep_archive else "deleted",
                study_uid=w.study_uid,
            )
            for w in work
        }
        self.to_archive = [w.study_uid for w in work if w.keep_archive]
        self.to_delete = [w.study_uid for w in work if not w.keep_archive]
        self.objects = pd.DataFrame()
        self.studies = pd.DataFrame()
        self.doomed = pd.DataFrame()
        self.key_ids: list[str] = []
        self.drop_keys: list[str] = []  # sealed drop names to erase with the studies
        self.drops: list[tuple[str, str]] = []  # (facility_id, drop_id): their receipts go
        self.scan_rows: list[dict[str, Any]] = []
        self.members: dict[str, list[str]] = {}  # study -> its series and instance UIDs
        self.quotes: dict[str, list[str]] = {}  # study -> its patient's name and ID
        self.packages_left: set[str] = set()  # studies with a delivered package not gone

    # -- 1. revoke, mark, tombstone: one transaction -----------------------------------

    def mark(self) -> None:
        # The UIDs the catalog scan must not find, sealed before any row goes, so a sweep
        # killed after the rows went still scans for them (deletion_scans).
        needles: dict[str, list[str]] = {}
        for study in self.to_delete:
            needles.setdefault(self.by_uid[study].request_id, []).append(study)
        self.quotes = self._patient_quotes()
        self.scan_rows = scan_rows(self.home, needles, self.quotes)
        self.objects, self.studies = self.home.catalog.write(self._mark)
        for uid, count in zip(self.studies["study_uid"], self.studies["instances"], strict=True):
            self.outcomes[str(uid)].instances = int(count)
        for uid, group in self.objects.groupby("study_uid"):
            self.outcomes[str(uid)].objects = len(group)

    def _mark(self, con: duckdb.DuckDBPyConnection) -> tuple[pd.DataFrame, pd.DataFrame]:
        insert_rows(con, "deletion_scans", self.scan_rows)
        self._revoke(con)
        con.execute(
            "UPDATE studies SET status = 'archived', rev = rev + 1"
            " WHERE study_uid IN (SELECT unnest(?::VARCHAR[]))",
            [self.to_archive],
        )
        con.execute(
            "UPDATE studies SET status = 'deleting', rev = rev + 1"
            " WHERE study_uid IN (SELECT unnest(?::VARCHAR[]))",
            [self.to_delete],
        )
        insert_rows(
            con,
            "tombstones",
            [
                {
                    "study_key": self.keys[s],
                    "request_id": self.by_uid[s].request_id,
                    "outcome": "deleted",
                    "created_at": self.now,
                }
                for s in self.to_delete
            ],
            ignore_existing=True,
        )
        self._claim_quarantined(con)
        objects = con.execute(
            "SELECT i.study_uid, o.object_id, o.kind, o.location_url, o.name, o.record_key_id"
            " FROM objects o JOIN instances i USING (object_id) WHERE i.study_uid"
            " IN (SELECT unnest(?::VARCHAR[]))"
            " UNION ALL"
            " SELECT q.study_uid, o.object_id, o.kind, o.location_url, o.name, o.record_key_id"
            " FROM objects o JOIN quarantine q USING (object_id)"
            " WHERE q.study_uid IN (SELECT unnest(?::VARCHAR[]))",
            [self.uids, self.uids],
        ).df()
        studies = con.execute(
            "SELECT s.study_uid, s.record_key_id, count(i.sop_instance_uid) AS instances"
            " FROM studies s LEFT JOIN instances i USING (study_uid)"
            " WHERE s.study_uid IN (SELECT unnest(?::VARCHAR[])) GROUP BY 1, 2",
            [self.uids],
        ).df()
        self._record_what_must_go(con, objects, studies)
        # The drops that brought a study to be deleted: their folder names can name the
        # patient, so their sealed names go with it (their keys are destroyed in shred).
        self.drop_keys = [
            r[0]
            for r in con.execute(
                "SELECT DISTINCT d.record_key_id FROM drops d JOIN ("
                " SELECT facility_id, drop_id FROM instances"
                " WHERE study_uid IN (SELECT unnest(?::VARCHAR[]))"
                " UNION SELECT facility_id, drop_id FROM quarantine"
                " WHERE study_uid IN (SELECT unnest(?::VARCHAR[]))) x"
                " USING (facility_id, drop_id) WHERE d.record_key_id IS NOT NULL",
                [self.to_delete, self.to_delete],
            ).fetchall()
        ]
        self.drops = [
            (str(f), str(d))
            for f, d in con.execute(
                "SELECT facility_id, drop_id FROM instances"
                " WHERE study_uid IN (SELECT unnest(?::VARCHAR[]))"
                " UNION SELECT facility_id, drop_id FROM quarantine"
                " WHERE study_uid IN (SELECT unnest(?::VARCHAR[]))",
                [self.to_delete, self.to_delete],
            ).fetchall()
        ]
        return objects, studies

    def _claim_quarantined(self, con: duckdb.DuckDBPyConnection) -> None:
        """Tie to each study the quarantined files whose bytes claim it or one of its
        instances as their own (a damaged copy whose study UID no parse could read), so
        they go with it; and tombstone its instance UIDs, so a damaged copy arriving later
        is refused as a whole one is. Series UIDs are not matched: a file's series claim is
        no proof of identity, and one shared by another study's file would take it."""
        pepper = self.home.pepper
        keyed = {self.keys[s]: s for s in self.to_delete}
        for study, series, sop in con.execute(
            "SELECT study_uid, series_uid, sop_instance_uid FROM instances"
            " WHERE study_uid IN (SELECT unnest(?::VARCHAR[]))",
            [self.to_delete],
        ).fetchall():
            keyed.setdefault(study_key(pepper, sop), study)
            self.members.setdefault(study, []).extend((series, sop))
        con.register(
            "_uid_keys", pd.DataFrame({"uid_key": list(keyed), "study_uid": list(keyed.values())})
        )
        try:
            con.execute(
                "UPDATE quarantine SET study_uid = k.study_uid"
                " FROM quarantine_uids u JOIN _uid_keys k USING (uid_key)"
                # Whatever study it claims: a file bearing one of this study's UIDs is a
                # copy of its image (a copy filed under another study's UID too).
                " WHERE quarantine.quarantine_id = u.quarantine_id"
            )
        finally:
            con.unregister("_uid_keys")
        insert_rows(
            con,
            "tombstone_uids",
            [
                {"uid_key": k, "study_key": self.keys[s]}
                for k, s in keyed.items()
                if k != self.keys[s]
            ],
            ignore_existing=True,
        )

    def _patient_quotes(self) -> dict[str, list[str]]:
        """How free text may quote each study's patient (name, ID), read while the record
        keys live; a sweep resumed after they went reads what the stopped run sealed."""
        quotes = study_quotes(self.home.catalog, self.home.keystore, self.to_delete)
        missing = {self.by_uid[u].request_id for u in self.to_delete if u not in quotes}
        for uid, found in sealed_quotes(self.home, sorted(missing)).items():
            quotes.setdefault(uid, found)
        return quotes

    def replacements(self) -> dict[str, str]:
        """Each deleted study's UID, and its series and instance UIDs, to its tombstone key."""
        pepper = self.home.pepper
        return {
            uid: tombstone_ref(pepper, study)
            for study in self.to_delete
            for uid in (study, *self.members.get(study, ()))
        }

    def _revoke(self, con: duckdb.DuckDBPyConnection) -> None:
        grants = con.execute(
            "SELECT g.owner, g.grantee, g.study_uid FROM grants g"
            " JOIN studies s ON s.study_uid = g.study_uid AND s.owner = g.owner"
            " WHERE g.study_uid IN (SELECT unnest(?::VARCHAR[])) AND g.revoked_at IS NULL",
            [self.uids],
        ).fetchall()
        insert_grant_events(
            con,
            [
                GrantEvent(
                    # The grantee by a keyed hash: an id is kept verbatim, and a grantee's
                    # text could quote the UID (the grantee column itself is redacted).
                    event_id=f"deletion:{self.by_uid[s].request_id}:{self.keys[s]}:"
                    + keyed_hash(self.home.pepper, "grantee", g, length=16),
                    action="revoke",
                    owner=o,
                    grantee=g,
                    study_uid=s,
                    requested_at=self.now,
                    expires_at=None,
                    actor="deletion",
                    reason="deleted",
                    recorded_at=self.now,
                )
                for o, g, s in grants
            ],
        )
        recompute_grants(con, {(o, g) for o, g, _ in grants})

    def _record_what_must_go(
        self, con: duckdb.DuckDBPyConnection, objects: pd.DataFrame, studies: pd.DataFrame
    ) -> None:
        """What :meth:`verify` must find gone, kept past :meth:`delete_rows`."""
        delete = set(self.to_delete)
        rows = [
            (str(r.study_uid), r.location_url, r.name, r.record_key_id)
            for r in objects.itertuples()
            if r.study_uid in delete
        ] + [
            (str(r.study_uid), None, None, r.record_key_id)
            for r in studies.itertuples()
            if r.study_uid in delete
        ]
        con.execute(
            "DELETE FROM deletion_objects WHERE study_key IN (SELECT unnest(?::VARCHAR[]))",
            [[self.keys[u] for u in self.to_delete]],
        )
        insert_rows(
            con,
            "deletion_objects",
            [
                {
                    "request_id": self.by_uid[uid].request_id,
                    "study_key": self.keys[uid],
                    "location_url": url,
                    "name": name,
                    "record_key_id": key_id,
                }
                for uid, url, name, key_id in rows
            ],
        )

    # -- 2. the owner's election: move to the archive, repoint ---------------------------

    def archive(self) -> None:
        if not self.to_archive:
            return
        home = self.home
        to_archive = self.objects[self.objects["study_uid"].isin(self.to_archive)]
        sources = {}
        for obj in to_archive.itertuples():
            source = home.location_for(str(obj.location_url))
            sources[str(obj.object_id)] = source
            # A stopped run moved some already: those are no longer at the source.
            if source.url != home.archive.url and source.exists(str(obj.name)):
                source.move(str(obj.name), home.archive, str(obj.name))
                _fault("mid_archive")
        moved = list(to_archive["object_id"])
        home.catalog.write(
            lambda con: con.execute(
                "UPDATE objects SET location_url = ? WHERE object_id"
                " IN (SELECT unnest(?::VARCHAR[]))",
                [home.archive.url, moved],
            )
        )
        # Verified in its final place: in the archive, and nothing (no version, no delete
        # marker) left where it was.
        missing = {
            str(obj.study_uid)
            for obj in to_archive.itertuples()
            if not home.archive.exists(str(obj.name))
            or (
                sources[str(obj.object_id)].url != home.archive.url
                and sources[str(obj.object_id)].remaining(str(obj.name))
            )
        }
        for uid in self.to_archive:
            self.outcomes[uid].verified = uid not in missing

    def withdraw_deliveries(self) -> None:
        """Packages sent to grantees are encrypted to them, not under the study's keys:
        shredding does not reach them, so each is deleted (every version) and checked."""
        left = withdraw_studies(self.home, self.uids, self.now)
        for uid in left:
            self.outcomes[uid].verified = False
        self.packages_left = left

    # -- 3. crypto-shred: every key of every object, in one keystore call ----------------

    def shred(self) -> None:
        delete = set(self.to_delete)
        self.doomed = self.objects[self.objects["study_uid"].isin(self.to_delete)]
        study_key_ids = self.studies.loc[
            self.studies["study_uid"].isin(self.to_delete), "record_key_id"
        ]
        self.key_ids = sorted(set(self.doomed["record_key_id"]) | set(study_key_ids))
        # The facilities' receipts of the study's drops name its files (rerun-safe: the
        # catalog still lists the drops until the finish commits).
        delete_receipts(self.home.drops, self.drops)
        self.home.keystore.destroy(self.key_ids + self.drop_keys)
        shredded: dict[str, set[str]] = {}
        for uid, key_id in zip(self.doomed["study_uid"], self.doomed["record_key_id"], strict=True):
            shredded.setdefault(str(uid), set()).add(str(key_id))
        for uid, key_id in zip(
            self.studies["study_uid"], self.studies["record_key_id"], strict=True
        ):
            if uid in delete:
                shredded.setdefault(str(uid), set()).add(str(key_id))
        for uid in self.to_delete:
            self.outcomes[uid].keys = len(shredded.get(uid, set()))

    # -- 4. every object, every version ---------------------------------------------------

    def delete_objects(self) -> None:
        for obj in self.doomed.itertuples():
            location = self.home.location_for(str(obj.location_url))
            self.outcomes[str(obj.study_uid)].versions += location.delete(str(obj.name))
            if obj.kind == "quarantine":
                location.delete(str(obj.name)[: -len(".dvlt")] + ".json")

    # -- 5. files that quote the UIDs (processed manifests, incident reports) -------------

    def redact_files(self) -> None:
        """Before the rows go: a sweep stopped after this still knows the UIDs to redact."""
        redact_manifests(self.home.manifests, self.replacements(), self.quotes)

    # -- 6. the rows; legal history stays under the tombstone key -------------------------

    def delete_rows(self) -> None:
        self.home.catalog.write(self._delete_rows)

    def _delete_rows(self, con: duckdb.DuckDBPyConnection) -> None:
        delete = self.to_delete
        mapping = pd.DataFrame(
            {
                "study_uid": delete,
                "replacement": [tombstone_ref(self.home.pepper, u) for u in delete],
            }
        )
        con.register("_deleted", mapping)
        try:
            con.execute(
                "UPDATE audit_log SET subject = d.replacement FROM instances i"
                " JOIN _deleted d USING (study_uid) WHERE audit_log.subject = i.sop_instance_uid"
            )
            con.execute(
                "DELETE FROM quarantine_uids WHERE quarantine_id IN (SELECT quarantine_id"
                " FROM quarantine WHERE study_uid IN (SELECT unnest(?::VARCHAR[])))",
                [delete],
            )
            for table in ("instances", "quarantine"):
                con.execute(
                    f"DELETE FROM {table} WHERE study_uid IN (SELECT unnest(?::VARCHAR[]))",  # noqa: S608
                    [delete],
                )
            con.execute(
                "DELETE FROM objects WHERE object_id IN (SELECT unnest(?::VARCHAR[]))",
                [list(self.doomed["object_id"])],
            )
            con.execute(
                "DELETE FROM studies WHERE study_uid IN (SELECT unnest(?::VARCHAR[]))", [delete]
            )
            con.execute(
                "UPDATE drops SET name_enc = NULL WHERE record_key_id"
                " IN (SELECT unnest(?::VARCHAR[]))",
                [self.drop_keys],
            )
            _fault("mid_finish")
            _redact_tied(con, self.quotes)
            _redact_quoting(con, self.replacements())
            for table in history_tables():
                con.execute(
                    f"UPDATE {table} SET study_uid = d.replacement FROM _deleted d"  # noqa: S608
                    f" WHERE {table}.study_uid = d.study_uid"
                )
            self._complete_tombstones(con)
        finally:
            con.unregister("_deleted")

    def _complete_tombstones(self, con: duckdb.DuckDBPyConnection) -> None:
        counts = pd.DataFrame(
            [
                (o.study_key, o.instances, o.objects, o.versions, o.keys)
                for o in (self.outcomes[u] for u in self.to_delete)
            ],
            columns=["study_key", "instances", "objects", "versions", "keys"],
        )
        con.register("_counts", counts)
        try:
            con.execute(
                "UPDATE tombstones SET completed_at = ?, instances = c.instances,"
                " objects = c.objects, versions = c.versions, keys = c.keys"
                " FROM _counts c WHERE tombstones.study_key = c.study_key",
                [self.now],
            )
        finally:
            con.unregister("_counts")
        audit(
            con,
            actor="deletion",
            action="delete_studies",
            subject=f"{len(self.to_delete)} studies",
            detail={"objects": len(self.doomed), "keys": len(self.key_ids)},
            at=self.now,
        )

    # -- 7. verify: no version of any former object, no key that unwraps -----------------

    def verify(self) -> None:
        left: dict[str, int] = {}
        for obj in self.doomed.itertuples():
            n = self.home.location_for(str(obj.location_url)).remaining(str(obj.name))
            left[str(obj.study_uid)] = left.get(str(obj.study_uid), 0) + n
        live = self.home.keystore.live(self.key_ids)
        keys_of: dict[str, set[str]] = {}
        for uid, key_id in zip(self.doomed["study_uid"], self.doomed["record_key_id"], strict=True):
            keys_of.setdefault(str(uid), set()).add(str(key_id))
        for uid in self.to_delete:
            outcome = self.outcomes[uid]
            outcome.verified = (
                left.get(uid, 0) == 0
                and not (keys_of.get(uid, set()) & live)
                and uid not in self.packages_left
            )


def _redact_tied(con: duckdb.DuckDBPyConnection, quotes: dict[str, list[str]]) -> None:
    """A deleted study's patient (name, ID) quoted in free text of a row about that study
    (a share's purpose, an incident's report), or of a row from a manifest that carried
    one (its name, a rejected row's id ``<manifest>#<line>``): redacted in place. Other
    text is not searched (a name is not unique; it may be another patient's)."""
    if not quotes:
        return
    types = column_types()
    studies = sorted(quotes)
    every = sorted({q for qs in quotes.values() for q in qs})
    manifests = sorted(
        {
            str(r[0])
            for table in ("share_requests", "deletion_requests")
            for r in con.execute(
                f"SELECT DISTINCT manifest FROM {table}"  # noqa: S608
                " WHERE study_uid IN (SELECT unnest(?::VARCHAR[])) AND manifest IS NOT NULL",
                [studies],
            ).fetchall()
        }
    )
    for table, column in columns_of_kind("quoting:study"):
        if "study_uid" not in types[table]:
            continue
        keys = key_columns()[table]
        where = "study_uid IN (SELECT unnest(?::VARCHAR[]))"
        params: list[Any] = [studies]
        if "manifest" in types[table]:
            where = f"({where} OR manifest IN (SELECT unnest(?::VARCHAR[])))"
            params.append(manifests)
        if column == "request_id":
            # An applied request's id keys its history (intake refuses one quoting the
            # patient: phi_in_name); a rejected row's id is its manifest's name and line.
            where += " AND outcome LIKE 'rejected%'"
        rows = con.execute(
            f"SELECT {', '.join(keys)}, study_uid, {column} FROM {table}"  # noqa: S608
            f" WHERE {where} AND {column} IS NOT NULL",
            params,
        ).fetchall()
        updates = []
        for *key, study, text in rows:
            new = redact_quotes(str(text), quotes.get(str(study), every))
            if new != text:
                updates.append([new, *key])
        if updates:
            set_where = " AND ".join(f"{k} = ?" for k in keys)
            con.executemany(
                f"UPDATE {table} SET {column} = ? WHERE {set_where}",  # noqa: S608
                updates,
            )


def _redact_quoting(con: duckdb.DuckDBPyConnection, replacements: dict[str, str]) -> None:
    """Free text that can quote a deleted study's UID (an incident's report, a request's
    purpose or grantee, a manifest's name), in any row: each whole UID is replaced by its
    tombstone key, in place. RE2 finds the candidate rows; Python decides whole UIDs."""
    candidates = "|".join(re.escape(u) for u in replacements)
    for table, column in columns_of_kind("quoting:study"):
        keys = key_columns()[table]
        rows = con.execute(
            f"SELECT {', '.join(keys)}, {column} FROM {table}"  # noqa: S608
            f" WHERE regexp_matches({column}, ?)",
            [candidates],
        ).fetchall()
        where = " AND ".join(f"{k} = ?" for k in keys)
        updates = []
        for row in rows:
            text = str(row[-1])
            new = redact(text, replacements)
            if new != text:
                updates.append([new, *row[: len(keys)]])
        if updates:
            con.executemany(
                f"UPDATE {table} SET {column} = ? WHERE {where}",  # noqa: S608
                updates,
            )


# Tables whose rows go with a deleted study; every other table with a study UID column
# (storage/identifiers.py) is history, kept with the UID replaced by its tombstone key.
REMOVED_WITH_STUDY = ("instances", "quarantine", "studies")


def history_tables() -> list[str]:
    """Tables whose rows outlive a deleted study (grants, events, requests, disclosures,
    incidents, and any table a later migration adds with a ``study_uid``)."""
    return sorted({t for t, _ in columns_of_kind("study")} - set(REMOVED_WITH_STUDY))


def delete_studies(home: Home, work: list[StudyWork], now: datetime) -> list[StudyOutcome]:
    """Delete (or archive) a batch of studies through the stages of :class:`_Sweep`."""
    if not work:
        return []
    sweep = _Sweep(home, work, now)
    sweep.mark()
    _fault("after_mark")
    sweep.archive()
    sweep.withdraw_deliveries()
    if not sweep.to_delete:
        return list(sweep.outcomes.values())
    sweep.shred()
    _fault("after_shred")
    sweep.delete_objects()
    _fault("after_objects")
    sweep.redact_files()
    sweep.delete_rows()
    _fault("after_finish")
    sweep.verify()
    return list(sweep.outcomes.values())


def tombstoned(catalog: Catalog, pepper: bytes, uids: list[str]) -> dict[str, str]:
    """``{uid: tombstone ref}`` for those of ``uids`` whose study was deleted: a manifest
    that names one is archived with the tombstone key in its place."""
    keys = {study_key(pepper, u): u for u in set(uids) if u and u != "*"}
    if not keys:
        return {}
    found = catalog.query(
        "SELECT study_key FROM tombstones WHERE study_key IN (SELECT unnest(?::VARCHAR[]))",
        [sorted(keys)],
    )
    return {keys[str(k)]: "deleted:" + str(k) for k in found["study_key"]}


def verify_recorded(home: Home, request_ids: list[str]) -> dict[str, bool]:
    """For each request with recorded objects: is every one gone and every key dead?"""
    rows = home.catalog.query(
        "SELECT request_id, location_url, name, record_key_id FROM deletion_objects"
        " WHERE request_id IN (SELECT unnest(?::VARCHAR[]))",
        [request_ids],
    )
    if rows.empty:
        return {}
    live = home.keystore.live(sorted(set(rows["record_key_id"])))
    ok: dict[str, bool] = {}
    for rid, url, name, key_id in rows.itertuples(index=False):
        gone = key_id not in live
        if gone and isinstance(name, str):
            gone = not home.location_for(str(url)).remaining(name)
        ok[str(rid)] = ok.get(str(rid), True) and gone
    return ok


@dataclass
class SweepResult:
    requests_done: int = 0
    studies: list[StudyOutcome] = field(default_factory=list)
    intake: IntakeResult = field(default_factory=IntakeResult)
    compacted: str = ""
    quarantine_expired: int = 0  # files past the quarantine's retention, shredded
    resumed: int = 0  # requests whose rows an interrupted run deleted, verified by this one
    sla: dict[str, int] = field(default_factory=dict)
    planned: list[dict[str, Any]] = field(default_factory=list)  # dry run only
    request_ids: list[str] = field(default_factory=list)  # carried out by this run

    def summary(self) -> dict[str, Any]:
        return {
            "requests_received": self.intake.applied,
            "requests_rejected": sum(self.intake.rejected.values()),
            "requests_completed": self.requests_done,
            "studies_deleted": sum(1 for s in self.studies if s.outcome == "deleted"),
            "studies_archived": sum(1 for s in self.studies if s.outcome == "archived"),
            "objects": sum(s.objects for s in self.studies),
            "all_verified": all(s.verified for s in self.studies),
            "quarantine_expired": self.quarantine_expired,
            "catalog_compaction": self.compacted,
            **{f"sla_{k}": v for k, v in sorted(self.sla.items())},
        }

    def _repr_html_(self) -> str:
        """A table for notebooks."""
        rows = [{"metric": k, "value": str(v)} for k, v in self.summary().items()]
        return pd.DataFrame(rows).to_html(index=False)


def _resolve(home: Home, reqs: list[Any]) -> list[StudyWork]:
    """The studies each request covers (a study named twice goes to the first request)."""

    def resolve(con: duckdb.DuckDBPyConnection) -> list[StudyWork]:
        wanted = pd.DataFrame(
            [
                (str(r.request_id), str(r.owner), str(r.study_uid), bool(r.keep_archive))
                for r in reqs
            ],
            columns=["request_id", "owner", "scope", "keep_archive"],
        )
        con.register("_wanted", wanted)
        try:
            found = con.execute(
                "SELECT w.request_id, w.owner, s.study_uid, w.keep_archive FROM _wanted w"
                " JOIN studies s ON s.owner = w.owner AND (w.scope = '*' OR s.study_uid = w.scope)"
                " WHERE s.status IN ('active', 'deleting')"
                # An archived study deleted again, without keep_archive: its archive goes.
                " OR (s.status = 'archived' AND NOT w.keep_archive)"
                # An archive move a stopped run left half done: it resumes.
                " OR (s.status = 'archived' AND w.keep_archive AND s.study_uid IN ("
                "  SELECT i.study_uid FROM instances i JOIN objects o USING (object_id)"
                "  WHERE o.location_url <> ?))"
                " ORDER BY w.request_id, s.study_uid",
                [home.archive.url],
            ).fetchall()
        finally:
            con.unregister("_wanted")
        work: list[StudyWork] = []
        seen: set[str] = set()
        for request_id, owner, uid, keep in found:
            if uid not in seen:  # two requests naming one study: the first takes it
                seen.add(uid)
                work.append(StudyWork(request_id, owner, uid, bool(keep)))
        return work

    return home.catalog.write(resolve)


def _complete(home: Home, rows: list[tuple[Any, ...]], verified: list[str]) -> None:
    """Mark the requests completed; those whose objects are proven gone drop their record
    of what must go. Verified only once no UID of theirs waits for the catalog scan."""

    def complete(con: duckdb.DuckDBPyConnection) -> None:
        con.executemany(
            "UPDATE deletion_requests SET status = 'completed', outcome = 'applied',"
            " completed_at = ?,"
            " verified_at = ?, studies = ?, objects = ? WHERE request_id = ?",
            rows,
        )
        # The flow verifies these once the scan passes (verify_scanned).
        con.execute(
            "UPDATE deletion_requests SET verified_at = NULL"
            " WHERE request_id IN (SELECT request_id FROM deletion_scans)"
        )
        con.execute(
            "DELETE FROM deletion_objects WHERE request_id IN (SELECT unnest(?::VARCHAR[]))",
            [verified],
        )

    home.catalog.write(complete)


def sweep_requests(home: Home, requests: pd.DataFrame, now: datetime) -> SweepResult:
    """Carry out a batch of pending requests; each is completed once all its studies are."""
    result = SweepResult()
    if requests.empty:
        return result
    reqs = list(requests.itertuples())
    done = delete_studies(home, _resolve(home, reqs), now)
    result.studies = done
    finished = datetime.now(UTC)
    per_request: dict[str, list[StudyOutcome]] = {str(r.request_id): [] for r in reqs}
    for outcome in done:
        per_request[outcome.request_id].append(outcome)
    # Also what earlier, interrupted runs of these requests recorded (step 1 of delete_studies).
    recorded = verify_recorded(home, list(per_request))
    verified = [
        rid
        for rid, outs in per_request.items()
        if all(o.verified for o in outs) and recorded.get(rid, True)
    ]
    rows = [
        (
            finished,
            finished if rid in verified else None,
            len(outs),
            sum(o.objects for o in outs),
            rid,
        )
        for rid, outs in per_request.items()
    ]
    # Resumed: an interrupted run deleted its rows (recorded objects to verify), or its
    # compaction scan failed (status 'failed'): either way this run compacts again.
    failed_before = {str(r.request_id) for r in reqs if getattr(r, "status", "") == "failed"}
    result.resumed = sum(
        1
        for rid, outs in per_request.items()
        if not outs and (rid in recorded or rid in failed_before)
    )
    result.request_ids = list(per_request)
    _complete(home, rows, verified)
    result.requests_done = len(rows)
    return result


def scan_rows(
    home: Home, needles: dict[str, list[str]], quotes: dict[str, list[str]] | None = None
) -> list[dict[str, Any]]:
    """``deletion_scans`` rows keeping each request's UIDs sealed (one new record key) until
    a catalog scan proves them gone, with its patient's quotes (for a resumed sweep)."""
    if not needles:
        return []
    quotes = quotes or {}
    key_id, record_key = home.keystore.create()
    return [
        {
            "request_id": rid,
            "record_key_id": key_id,
            "needles_enc": seal_fields(
                record_key,
                rid,
                {
                    "uids": json.dumps(sorted(uids)),
                    "quotes": json.dumps({u: quotes.get(u, []) for u in uids}),
                },
            ),
        }
        for rid, uids in needles.items()
    ]


def sealed_quotes(home: Home, request_ids: list[str]) -> dict[str, list[str]]:
    """The patient quotes an earlier sweep of these requests sealed in ``deletion_scans``."""
    if not request_ids:
        return {}
    rows = home.catalog.query(
        "SELECT request_id, record_key_id, needles_enc FROM deletion_scans"
        " WHERE request_id IN (SELECT unnest(?::VARCHAR[]))",
        [request_ids],
    )
    found: dict[str, list[str]] = {}
    for rid, key_id, sealed in rows.itertuples(index=False):
        try:
            fields = open_fields(home.keystore.unwrap(str(key_id)), str(rid), bytes(sealed))
        except (KeyError_, InvalidTag):
            continue
        for uid, values in json.loads(fields.get("quotes", "{}")).items():
            found.setdefault(uid, []).extend(values)
    return found


def open_scan_needles(home: Home) -> tuple[list[str], list[str], list[str]]:
    """``(uids, key ids, request ids)`` of every deletion not yet proven by a catalog scan."""
    rows = home.catalog.query("SELECT request_id, record_key_id, needles_enc FROM deletion_scans")
    uids: list[str] = []
    for rid, key_id, sealed in rows.itertuples(index=False):
        try:
            key = home.keystore.unwrap(str(key_id))
        except KeyError_:
            continue
        uids += json.loads(open_fields(key, str(rid), bytes(sealed))["uids"])
    return uids, sorted(set(rows["record_key_id"])), sorted(set(rows["request_id"]))


def verify_scanned(home: Home, key_ids: list[str], now: datetime) -> None:
    """The scan passed: the requests whose UIDs it looked for are verified (unless an object
    of theirs is still unproven), and the sealed UIDs' key is destroyed, their rows deleted."""
    if not key_ids:
        return

    def work(con: duckdb.DuckDBPyConnection) -> None:
        con.execute(
            "UPDATE deletion_requests SET verified_at = ? WHERE status = 'completed'"
            " AND request_id IN (SELECT request_id FROM deletion_scans"
            " WHERE record_key_id IN (SELECT unnest(?::VARCHAR[])))"
            " AND request_id NOT IN (SELECT request_id FROM deletion_objects)",
            [now, key_ids],
        )
        con.execute(
            "DELETE FROM deletion_scans WHERE record_key_id IN (SELECT unnest(?::VARCHAR[]))",
            [key_ids],
        )

    home.catalog.write(work)
    home.keystore.destroy(key_ids)


class CatalogScanFailed(TerminalError, RuntimeError):
    """After compaction, the byte scan still found a deleted study's identifier."""


def mark_unverified(catalog: Catalog, request_ids: list[str], reason: str) -> None:
    """Requests whose deletion could not be proven: ``failed`` (with the reason in
    ``outcome``), not verified, and taken again by the next sweep."""
    if request_ids:
        catalog.write(
            lambda con: con.execute(
                "UPDATE deletion_requests SET status = 'failed', verified_at = NULL,"
                " outcome = ? WHERE request_id IN (SELECT unnest(?::VARCHAR[]))",
                ["failed:" + reason, request_ids],
            )
        )


def compact_catalog(
    catalog: Catalog, deleted_uids: list[str], sample: int = 256, resumed: int = 0
) -> str:
    """Make deleted rows' bytes leave the catalog's files.

    DuckDB does not zero the blocks of deleted rows, and a CHECKPOINT alone was seen
    to leave them, so the file is rewritten; on DuckLake the data files holding
    deletes are rewritten and older snapshots expired and cleaned up
    (``Catalog.compact``). Then a byte scan for the deleted UIDs (all of them, or a
    sample of ``sample`` on a large sweep) must find none.
    """
    if not deleted_uids and not resumed:
        return "nothing deleted"
    catalog.compact()  # also after a resumed deletion: its rows went in the interrupted run
    needles = deleted_uids if len(deleted_uids) <= sample else random.sample(deleted_uids, sample)
    if needles and catalog.holds(needles):
        raise CatalogScanFailed(
            "deleted identifiers are still in the catalog's files after compaction"
        )
    if not needles:
        return f"compacted after {resumed} resumed deletion(s)"
    return f"compacted, byte scan of {len(needles)} UIDs clean"


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
    retry_condition_fn=retry_transient,
    retry_delay_seconds=[1, 5],
    cache_policy=NO_CACHE,
)(register_deletion_rows)
sweep_requests_task = task(
    name="sweep-requests",
    retries=2,
    retry_condition_fn=retry_transient,
    retry_delay_seconds=[1, 5],
    cache_policy=NO_CACHE,
)(sweep_requests)
compact_catalog_task = task(
    name="compact-catalog",
    retries=2,
    retry_condition_fn=retry_transient,
    retry_delay_seconds=[1, 5],
    cache_policy=NO_CACHE,
)(compact_catalog)
