"""Ingest a batch of dropped files: validate, dedupe, encrypt, commit, then remove sources.

The order is what makes a crash safe at any point:

1. read each file once (small files stay in memory), hash it, parse its header;
2. look up its SOP Instance UID (and the batch's studies) in the catalog;
3. encrypt new instances into the vault and read each one back to verify;
4. commit every catalog row of the batch in one transaction, re-checking the
   UIDs inside it, so a concurrent run cannot double a row;
5. only then delete the source files.

A crash before 4 leaves vault objects without catalog rows (orphans) and the
sources in place, so a rerun redoes the batch; the batch named those objects in
a pending record before writing them, and the next run's reconcile removes them
(:func:`tasks.reconcile.settle_pending`). A crash after 4 leaves sources whose
UID and content are cataloged: a rerun counts them as duplicates and removes them.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

import duckdb
from prefect import task
from prefect.cache_policies import NO_CACHE

from storage.catalog import insert_rows
from storage.home import Home
from storage.vault import IntegrityError, Vault
from tasks.dicom import DicomHeader, DicomRejected, header_from_bytes, read_header
from tasks.drops import Drop, DropFile
from tasks.phi import keyed_hash, patient_key, seal_fields
from tasks.quarantine import (
    Quarantined,
    quarantine_file,
    quarantine_id,
    quarantine_object_name,
)
from tasks.reconcile import clear_pending, record_pending

IN_MEMORY_MAX = 8 * 1024 * 1024  # files up to this size are read once and kept for the batch


def study_key(pepper: bytes, study_uid: str) -> str:
    """The tombstone key of a study (a keyed hash: the catalog never keeps a deleted UID)."""
    return "st_" + keyed_hash(pepper, "study", study_uid)


@dataclass
class DropCounts:
    files_seen: int = 0
    ingested: int = 0
    duplicates: int = 0
    quarantined: int = 0
    bytes: int = 0


@dataclass
class IngestStats:
    """Counters for one run; ``quarantined`` is by reason code, ``drops`` by drop key."""

    files_seen: int = 0
    ingested: int = 0
    duplicates: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)
    bytes: int = 0
    seconds: float = 0.0
    drops_done: int = 0
    drops_waiting: int = 0
    sources_changed: int = 0  # replaced while being ingested: left for the next run
    drops: dict[str, DropCounts] = field(default_factory=dict)
    # Files whose UID another batch (or worker) cataloged while this one ran: not counted
    # yet, their sources untouched; a later batch classifies them (duplicate or conflict).
    retry: list[tuple[Drop, DropFile]] = field(default_factory=list)

    def count(self, drop: Drop, what: str, n: int = 1) -> None:
        counts = self.drops.setdefault(drop.key, DropCounts())
        setattr(counts, what, getattr(counts, what) + n)

    def add(self, other: IngestStats) -> None:
        self.files_seen += other.files_seen
        self.ingested += other.ingested
        self.duplicates += other.duplicates
        self.quarantined.update(other.quarantined)
        self.bytes += other.bytes
        self.drops_done += other.drops_done
        self.drops_waiting += other.drops_waiting
        self.sources_changed += other.sources_changed
        self.retry += other.retry
        for key, counts in other.drops.items():
            mine = self.drops.setdefault(key, DropCounts())
            for name in ("files_seen", "ingested", "duplicates", "quarantined", "bytes"):
                setattr(mine, name, getattr(mine, name) + getattr(counts, name))

    def as_dict(self) -> dict[str, Any]:
        return {
            "files_seen": self.files_seen,
            "ingested": self.ingested,
            "duplicates": self.duplicates,
            "quarantined": sum(self.quarantined.values()),
            "quarantined_by_reason": dict(sorted(self.quarantined.items())),
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "drops_done": self.drops_done,
            "drops_waiting": self.drops_waiting,
            "sources_changed": self.sources_changed,
        }

    def table(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = [
            {"metric": k, "value": v}
            for k, v in self.as_dict().items()
            if k != "quarantined_by_reason"
        ]
        rows += [
            {"metric": f"quarantined:{r}", "value": n} for r, n in sorted(self.quarantined.items())
        ]
        return rows

    def _repr_html_(self) -> str:
        import pandas as pd  # only a notebook renders this

        return pd.DataFrame(self.table()).to_html(index=False)


@dataclass
class _Read:
    drop: Drop
    file: DropFile
    sha256: str
    data: bytes | None  # None: too big to keep, re-read from the source
    header: DicomHeader | None = None
    quarantine_id: str = ""  # deterministic, so a rerun finds an earlier quarantine


# Fault-injection points for crash tests: name -> callable run at that point.
FAULTS: dict[str, Callable[[], None]] = {}


def _fault(point: str) -> None:
    hook = FAULTS.get(point)
    if hook is not None:
        hook()


def _hash_stream(src: IO[bytes]) -> str:
    digest = hashlib.sha256()
    while chunk := src.read(1024 * 1024):
        digest.update(chunk)
    return digest.hexdigest()


class _Batch:
    def __init__(self, home: Home, now: datetime) -> None:
        self.home = home
        self.now = now
        self.vault: Vault = home.vault_store()
        self.stats = IngestStats()
        self.quarantined: list[Quarantined] = []
        self.known_quarantine: set[str] = set()
        self.to_remove: list[str] = []
        self.to_quarantine: list[tuple[_Read, str, str, str | None]] = []

    def open_source(self, item: _Read) -> IO[bytes]:
        if item.data is not None:
            return io.BytesIO(item.data)
        return self.home.drops.open(item.file.name, unchecked=True)

    def quarantine(
        self, item: _Read, reason: str, detail: str, study_uid: str | None = None
    ) -> None:
        """Count a file as quarantined; :meth:`write_quarantine` stores it later."""
        self.stats.quarantined[reason] += 1
        self.stats.count(item.drop, "quarantined")
        self.to_remove.append(item.file.name)
        if item.quarantine_id not in self.known_quarantine:  # else an earlier run stored it
            self.to_quarantine.append((item, reason, detail, study_uid))

    def quarantine_names(self) -> list[str]:
        return [
            quarantine_object_name(i.drop.facility_id, i.drop.drop_id, i.quarantine_id)
            for i, *_ in self.to_quarantine
        ]

    def write_quarantine(self) -> None:
        for item, reason, detail, study_uid in self.to_quarantine:
            if item.quarantine_id in self.known_quarantine:
                continue  # the same file listed twice in this batch
            with self.open_source(item) as src:
                self.quarantined.append(
                    quarantine_file(
                        self.home,
                        facility_id=item.drop.facility_id,
                        drop_id=item.drop.drop_id,
                        source_name=item.file.name,
                        src=src,
                        size=item.file.size,
                        sha256=item.sha256,
                        reason=reason,
                        detail=detail,
                        study_uid=study_uid,
                        now=self.now,
                    )
                )
            self.known_quarantine.add(item.quarantine_id)

    def read(self, drop: Drop, f: DropFile) -> _Read:
        drops = self.home.drops
        if f.size <= IN_MEMORY_MAX:
            data = drops.read_bytes(f.name, unchecked=True)
            item = _Read(drop, f, hashlib.sha256(data).hexdigest(), data)
        else:
            with drops.open(f.name, unchecked=True) as src:
                item = _Read(drop, f, _hash_stream(src), None)
        item.quarantine_id = quarantine_id(
            self.home.pepper, drop.facility_id, drop.drop_id, f.name, item.sha256
        )
        return item


def remove_sources(home: Home, work: list[tuple[Drop, DropFile]], names: list[str]) -> int:
    """Delete the handled sources that a fresh listing shows unchanged; returns how many
    were left in place because they changed since they were listed."""
    if not names:
        return 0
    listed: dict[str, DropFile] = {f.name: f for _, f in work}
    prefixes = sorted({f"{d.facility_id}/{d.drop_id}" for d, _ in work})
    current = {e.name: e for prefix in prefixes for e in home.drops.list(prefix)}
    changed = 0
    for name in names:
        now = current.get(name)
        if now is None:
            continue  # already gone (another run, or an earlier attempt of this one)
        if not listed[name].unchanged(now):
            changed += 1
            continue
        home.drops.delete(name, unchecked=True)
    return changed


def _existing(
    home: Home, uids: list[str], studies: list[str], qids: list[str]
) -> tuple[dict[str, str], dict[str, str], set[str], set[str]]:
    """Catalog look-ups for a batch: instance sha by UID, record key by study, known
    quarantine ids, and the studies an owner deleted (tombstoned)."""
    if not uids and not studies and not qids:
        return {}, {}, set(), set()
    keys = {study_key(home.pepper, s): s for s in studies}
    inst, stud, quar, tomb = home.catalog.read_only().many(
        [
            (
                "SELECT sop_instance_uid, sha256 FROM instances"
                " WHERE sop_instance_uid IN (SELECT unnest(?::VARCHAR[]))",
                [uids],
            ),
            (
                "SELECT study_uid, record_key_id FROM studies WHERE study_uid"
                " IN (SELECT unnest(?::VARCHAR[]))",
                [studies],
            ),
            (
                "SELECT quarantine_id FROM quarantine WHERE quarantine_id"
                " IN (SELECT unnest(?::VARCHAR[]))",
                [qids],
            ),
            (
                "SELECT study_key FROM tombstones WHERE study_key IN (SELECT unnest(?::VARCHAR[]))",
                [list(keys)],
            ),
        ]
    )
    return (
        dict(zip(inst["sop_instance_uid"], inst["sha256"], strict=True)),
        dict(zip(stud["study_uid"], stud["record_key_id"], strict=True)),
        set(quar["quarantine_id"]),
        {keys[k] for k in tomb["study_key"]},
    )


def _check(item: _Read, max_file_bytes: int) -> tuple[str, str] | None:
    """The quarantine reason for a file, or None when it is a valid DICOM file."""
    drop, f = item.drop, item.file
    if not f.safe:
        return "unsafe_name", "file name escapes its drop"
    if f.size > max_file_bytes:
        return "too_large", f"file is over the {max_file_bytes}-byte limit"
    if drop.state == "incomplete":
        return "incomplete_drop", drop.why or "manifest never completed"
    if f.expected_sha256 and f.expected_sha256 != item.sha256:
        return "checksum_mismatch", "SHA-256 differs from the manifest"
    return None


def ingest_batch(
    home: Home,
    work: list[tuple[Drop, DropFile]],
    *,
    max_file_bytes: int,
    now: datetime | None = None,
    cpu_turn: AbstractContextManager[object] | None = None,
) -> IngestStats:
    """Ingest a batch of files (from one or more drops). Safe to rerun after a crash anywhere.

    ``cpu_turn`` (a lock shared by the batches one run has in flight) is held while the
    batch reads, parses and looks up its files, and released before it encrypts, writes,
    syncs and commits.
    """
    started = time.perf_counter()
    now = now or datetime.now(UTC)
    batch = _Batch(home, now)
    stats = batch.stats

    # Steps 1-2 (and 3's key set-up) are Python work; batches in flight take turns here, so
    # one parses while the one before it writes, syncs, commits and removes its sources.
    with cpu_turn if cpu_turn is not None else nullcontext():
        # 1. Read, hash and parse.
        reads: list[_Read] = []
        for drop, f in work:
            try:
                reads.append(batch.read(drop, f))
            except FileNotFoundError:
                continue  # vanished since the listing (another run took it)
            stats.files_seen += 1
            stats.count(drop, "files_seen")
        parsed: list[_Read] = []
        rejected: list[tuple[_Read, str, str]] = []
        for item in reads:
            problem = _check(item, max_file_bytes)
            if problem is not None:
                rejected.append((item, *problem))
                continue
            try:
                if item.data is not None:
                    item.header = header_from_bytes(item.data)
                else:
                    with batch.open_source(item) as fp:
                        item.header = read_header(fp, item.file.size)
                parsed.append(item)
            except DicomRejected as exc:
                rejected.append((item, exc.reason, exc.detail))
        _fault("after_parse")

        # 2. Dedupe against the catalog and within the batch.
        headers = [r.header for r in parsed if r.header is not None]
        known_sha, study_keys, batch.known_quarantine, deleted = _existing(
            home,
            [h.sop_instance_uid for h in headers],
            sorted({h.study_uid for h in headers}),
            [r.quarantine_id for r in reads],
        )
        for item, reason, detail in rejected:
            batch.quarantine(item, reason, detail)
        fresh: list[tuple[_Read, DicomHeader]] = []
        seen: dict[str, str] = dict(known_sha)
        for item in parsed:
            header = item.header
            assert header is not None  # noqa: S101 - parsed items have headers
            prior = seen.get(header.sop_instance_uid)
            if header.study_uid in deleted:
                # The owner deleted this study while the file was on its way: the tombstone wins.
                batch.quarantine(item, "deleted_by_owner", "study was deleted by its owner")
            elif prior is None:
                seen[header.sop_instance_uid] = item.sha256
                fresh.append((item, header))
            elif prior == item.sha256:
                stats.duplicates += 1
                stats.count(item.drop, "duplicates")
                batch.to_remove.append(item.file.name)
            else:
                batch.quarantine(
                    item,
                    "uid_conflict",
                    "SOP Instance UID known with other content",
                    header.study_uid,
                )

        # 3. New studies get a record key (one keystore transaction), then encrypt and verify.
        new_study_uids = sorted({h.study_uid for _, h in fresh} - set(study_keys))
        new_keys = dict(
            zip(new_study_uids, home.keystore.create_many(len(new_study_uids)), strict=True)
        )
        new_studies: dict[str, dict[str, Any]] = {}
        for item, header in fresh:
            if header.study_uid in new_keys and header.study_uid not in new_studies:
                key_id, record_key = new_keys[header.study_uid]
                study_keys[header.study_uid] = key_id
                pkey = patient_key(home.pepper, header.issuer, header.patient_id)
                new_studies[header.study_uid] = {
                    "study_uid": header.study_uid,
                    "patient_key": pkey,
                    "owner": item.drop.owners.get(header.study_uid) or f"patient:{pkey}",
                    "facility_id": item.drop.facility_id,
                    "record_key_id": key_id,
                    "phi_enc": seal_fields(record_key, header.study_uid, header.phi()),
                    "status": "active",
                    "created_at": now,
                }
        instance_rows: list[dict[str, Any]] = []
        object_rows: list[dict[str, Any]] = []
        source_of: dict[str, _Read] = {}  # object id -> what it was read from
        planned = [(item, header, uuid.uuid4().hex) for item, header in fresh]
        written = [Vault.object_name(object_id) for *_, object_id in planned]
        # Name every object before writing any: a batch stopped from here on leaves a record
        # that the next run's reconcile settles, without listing the whole vault.
        pending = record_pending(home, written, batch.quarantine_names())
        batch.write_quarantine()
    # 3b. Encrypt, write and read back outside the turn: creating a file is mostly kernel
    # time, which the other batch's parse can overlap.
    for item, header, object_id in planned:
        key_id = study_keys[header.study_uid]
        name = Vault.object_name(object_id)
        try:
            with batch.open_source(item) as src:
                _fault("mid_encrypt")
                sealed = batch.vault.put(name, src, key_id, fresh=True)
            batch.vault.verify(name, sealed)
        except IntegrityError:
            continue  # left in the drop; the next run tries again
        if sealed.sha256 != item.sha256:
            continue  # the source changed while we read it: try again next run
        source_of[object_id] = item
        object_rows.append(
            {
                "object_id": object_id,
                "kind": "instance",
                "location_url": home.vault.url,
                "region": home.region,
                "name": name,
                "record_key_id": key_id,
                "plaintext_bytes": sealed.plaintext_bytes,
                "stored_bytes": sealed.stored_bytes,
                "created_at": now,
            }
        )
        instance_rows.append(
            {
                "sop_instance_uid": header.sop_instance_uid,
                "study_uid": header.study_uid,
                "series_uid": header.series_uid,
                "sop_class_uid": header.sop_class_uid,
                "modality": header.modality,
                "transfer_syntax": header.transfer_syntax,
                "rows": header.rows,
                "columns": header.columns,
                "frames": header.frames,
                "facility_id": item.drop.facility_id,
                "drop_id": item.drop.drop_id,
                "object_id": object_id,
                "sha256": item.sha256,
                "size_bytes": item.file.size,
                "ingested_at": now,
            }
        )
    _fault("after_vault_write")
    _fault("before_sync")
    # Durable before cataloged: the sources go once the commit lands.
    home.vault.flush()
    if batch.quarantined:
        home.quarantine.flush()

    # 4. Commit the batch in one transaction.
    facilities = sorted({d.facility_id for d, _ in work})

    def commit(con: duckdb.DuckDBPyConnection) -> set[str]:
        # Re-check inside the transaction: a concurrent run may have cataloged a UID since.
        uids_now = [r["sop_instance_uid"] for r in instance_rows]
        taken = {
            row[0]
            for row in con.execute(
                "SELECT sop_instance_uid FROM instances WHERE sop_instance_uid"
                " IN (SELECT unnest(?::VARCHAR[]))",
                [uids_now],
            ).fetchall()
        }
        tombstoned = {
            row[0]
            for row in con.execute(
                "SELECT study_key FROM tombstones WHERE study_key IN (SELECT unnest(?::VARCHAR[]))",
                [[study_key(home.pepper, r["study_uid"]) for r in instance_rows]],
            ).fetchall()
        }
        # A deletion that landed since step 2: leave these sources for the next run.
        taken |= {
            r["sop_instance_uid"]
            for r in instance_rows
            if study_key(home.pepper, r["study_uid"]) in tombstoned
        }
        keep = [r for r in instance_rows if r["sop_instance_uid"] not in taken]
        keep_ids = {r["object_id"] for r in keep}
        # Bump the studies we add to: a sweep marking one of them conflicts with this
        # transaction instead of racing it (see schema/005_study_revision.sql).
        grown = sorted({r["study_uid"] for r in keep} - set(new_studies))
        if grown:
            con.execute(
                "UPDATE studies SET rev = rev + 1 WHERE study_uid IN (SELECT unnest(?::VARCHAR[]))",
                [grown],
            )
        insert_rows(
            con,
            "facilities",
            [{"facility_id": f, "first_seen_at": now} for f in facilities],
            ignore_existing=True,
        )
        insert_rows(con, "studies", list(new_studies.values()), ignore_existing=True)
        insert_rows(con, "objects", [o for o in object_rows if o["object_id"] in keep_ids])
        insert_rows(con, "instances", keep)
        insert_rows(con, "objects", [q.object_row for q in batch.quarantined], ignore_existing=True)
        insert_rows(con, "quarantine", [q.row for q in batch.quarantined], ignore_existing=True)
        _fault("mid_commit")
        con.execute(
            "INSERT INTO audit_log VALUES (?, ?, 'ingest', 'ingest_batch', ?, ?)",
            [
                uuid.uuid4().hex,
                now,
                ",".join(sorted(stats.drops)),
                json.dumps(
                    {
                        "files": stats.files_seen,
                        "ingested": len(keep),
                        "duplicates": stats.duplicates,
                        "left_for_retry": len(taken),
                        "quarantined": dict(stats.quarantined),
                    }
                ),
            ],
        )
        return taken

    raced = home.catalog.write(commit)
    committed = [r for r in instance_rows if r["sop_instance_uid"] not in raced]
    for row in instance_rows:
        if row["sop_instance_uid"] in raced:
            # Another batch cataloged it meanwhile: hand the source back for a later batch
            # to classify (duplicate or conflict). Its copy goes below.
            item = source_of[row["object_id"]]
            stats.files_seen -= 1
            stats.count(item.drop, "files_seen", -1)
            stats.retry.append((item.drop, item.file))
    # Every written object is now cataloged or deleted here, so the record can go.
    cataloged = {Vault.object_name(r["object_id"]) for r in committed}
    for name in written:
        if name not in cataloged:  # raced, failed its read-back, or its source changed
            batch.vault.location.delete(name)
    clear_pending(home, pending)
    for row in committed:
        item = source_of[row["object_id"]]
        stats.count(item.drop, "ingested")
        stats.count(item.drop, "bytes", row["size_bytes"])
    stats.ingested = len(committed)
    stats.bytes = sum(r["size_bytes"] for r in committed)
    _fault("after_commit")

    # 5. Only now remove the sources, and only those still as they were listed: a facility
    # may have replaced one meanwhile, and the new object is the next run's to ingest.
    done_names = [source_of[r["object_id"]].file.name for r in committed]
    stats.sources_changed = remove_sources(home, work, batch.to_remove + done_names)
    stats.seconds = time.perf_counter() - started
    return stats


def batches(
    work: list[tuple[Drop, DropFile]], max_files: int, max_bytes: int
) -> Iterator[list[tuple[Drop, DropFile]]]:
    """Split files (of any number of drops) into batches bounded by count and in-memory bytes."""
    current: list[tuple[Drop, DropFile]] = []
    size = 0
    for drop, f in work:
        held = f.size if f.size <= IN_MEMORY_MAX else 0
        if current and (len(current) >= max_files or size + held > max_bytes):
            yield current
            current, size = [], 0
        current.append((drop, f))
        size += held
    if current:
        yield current


def record_drops(
    home: Home, drops: list[Drop], stats: IngestStats, finished: dict[str, bool], now: datetime
) -> None:
    """Upsert every processed drop's row with this run's counts, in one transaction."""
    rows = []
    for drop in drops:
        c = stats.drops.get(drop.key, DropCounts())
        done = finished.get(drop.key, False)
        status = ("incomplete" if drop.state == "incomplete" else "done") if done else "partial"
        rows.append(
            [
                drop.facility_id,
                drop.drop_id,
                drop.has_manifest,
                status,
                c.files_seen,
                c.ingested,
                c.duplicates,
                c.quarantined,
                c.bytes,
                now,
                now if done else None,
            ]
        )

    def work(con: duckdb.DuckDBPyConnection) -> None:
        # Update, then insert the new ones: DuckLake has no keys for ON CONFLICT.
        con.executemany(
            "UPDATE drops SET status = ?, files_seen = files_seen + ?, ingested = ingested + ?,"
            " duplicates = duplicates + ?, quarantined = quarantined + ?, bytes = bytes + ?,"
            " completed_at = ? WHERE facility_id = ? AND drop_id = ?",
            [[r[3], r[4], r[5], r[6], r[7], r[8], r[10], r[0], r[1]] for r in rows],
        )
        names = (
            *("facility_id", "drop_id", "has_manifest", "status", "files_seen", "ingested"),
            *("duplicates", "quarantined", "bytes", "first_seen_at", "completed_at"),
        )
        insert_rows(
            con, "drops", [dict(zip(names, r, strict=True)) for r in rows], ignore_existing=True
        )

    if rows:
        home.catalog.write(work)


def finish_drops(home: Home, drops: list[Drop]) -> dict[str, bool]:
    """Remove manifests and empty folders of drops whose every file is handled."""
    finished = {}
    for drop in drops:
        prefix = f"{drop.facility_id}/{drop.drop_id}"
        left = [e for e in home.drops.list(prefix) if e.name != drop.manifest_name]
        if left:
            finished[drop.key] = False
            continue
        if drop.manifest_name:
            home.drops.delete(drop.manifest_name, unchecked=True)
        home.drops.rmdir_empty(prefix)
        finished[drop.key] = True
    return finished


# Prefect wrappers: one task run per batch (a task run costs ~5 ms; per-file work is plain
# Python). Batches are idempotent, so retrying one after an I/O error is safe.
ingest_batch_task = task(
    name="ingest-batch", retries=2, retry_delay_seconds=[1, 5], cache_policy=NO_CACHE
)(ingest_batch)
record_drops_task = task(
    name="record-drops", retries=3, retry_delay_seconds=[1, 2, 5], cache_policy=NO_CACHE
)(record_drops)
finish_drops_task = task(
    name="finish-drops", retries=3, retry_delay_seconds=[1, 2, 5], cache_policy=NO_CACHE
)(finish_drops)
