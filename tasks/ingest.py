"""Ingest a batch of dropped files: validate, dedupe, encrypt, commit, then remove sources.

The order is what makes a crash safe at any point:

1. read each file once (small files stay in memory), hash it, parse its header;
2. look up its SOP Instance UID (and the batch's studies) in the catalog;
3. encrypt new instances into the vault and read each one back to verify (a large
   file is hashed here, as it is encrypted: see :func:`ingest_batch`'s ``one_pass``);
4. commit every catalog row of the batch in one transaction, re-checking the
   UIDs inside it, so a concurrent run cannot double a row;
5. only then delete the source files.

A crash before 4 leaves vault objects without catalog rows (orphans) and the
sources in place, so a rerun redoes the batch; the batch named those objects in
a pending record before writing them, and the next run's reconcile removes them
(:func:`dropvault.tasks.reconcile.settle_pending`). A crash after 4 leaves sources whose
UID and content are cataloged: a rerun counts them as duplicates and removes them.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any, cast

import duckdb
from prefect import task
from prefect.cache_policies import NO_CACHE

from dropvault.storage.catalog import insert_rows
from dropvault.storage.errors import retry_transient
from dropvault.storage.home import Home
from dropvault.storage.keystore import KeyDestroyedError
from dropvault.storage.locations import is_changed_source, is_file_problem, read_problem
from dropvault.storage.vault import HELPERS, IntegrityError, Sealed, Vault
from dropvault.tasks.audit import audit
from dropvault.tasks.dicom import (
    DicomHeader,
    DicomRejected,
    header_from_bytes,
    read_header,
    study_uid_hint,
    uids_named,
)
from dropvault.tasks.drop_names import seal_names
from dropvault.tasks.drops import Drop, DropFile
from dropvault.tasks.objects import object_row
from dropvault.tasks.phi import patient_key, seal_fields, study_key
from dropvault.tasks.quarantine import (
    Quarantined,
    discard_stored,
    quarantine_file,
    quarantine_id,
    quarantine_object_name,
    quarantine_shredded,
    quarantine_unreadable,
    unreadable_id,
)
from dropvault.tasks.reasons import QuarantineReason
from dropvault.tasks.reconcile import clear_pending, record_pending

log = logging.getLogger(__name__)
HINT_BYTES = 1 << 20  # a header that names the study lies well within the first MiB
IN_MEMORY_MAX = 8 * 1024 * 1024  # files up to this size are read once and kept for the batch


@dataclass
class DropCounts:
    files_seen: int = 0
    ingested: int = 0
    duplicates: int = 0
    quarantined: int = 0
    bytes: int = 0
    shredded: int = 0  # files of a deleted study: the drop's name goes too
    discarded: int = 0  # a CD's extras, counted and removed (cd_extras="discard")


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
    discarded: int = 0  # a CD's extras not kept (cd_extras="discard")
    drops: dict[str, DropCounts] = field(default_factory=dict)
    # Files whose UID another batch (or worker) cataloged while this one ran: not counted
    # yet, their sources untouched; a later batch classifies them (duplicate or conflict).
    retry: list[tuple[Drop, DropFile]] = field(default_factory=list)
    # For the facilities' receipts: each drop's quarantined files, ``(name as listed,
    # reason)`` (names are PHI for the catalog and logs; receipts go to the facility only).
    rejected: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    waiting: dict[str, str] = field(default_factory=dict)  # drop key -> why (PHI-free)

    def reject(self, drop: Drop, name: str, reason: str) -> None:
        self.rejected.setdefault(drop.key, []).append((name, str(reason)))

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
        self.discarded += other.discarded
        self.retry += other.retry
        for key, files in other.rejected.items():
            self.rejected.setdefault(key, []).extend(files)
        for key, counts in other.drops.items():
            mine = self.drops.setdefault(key, DropCounts())
            for name in DropCounts.__dataclass_fields__:
                setattr(mine, name, getattr(mine, name) + getattr(counts, name))

    def as_dict(self) -> dict[str, Any]:
        return {
            "files_seen": self.files_seen,
            "ingested": self.ingested,
            "duplicates": self.duplicates,
            "quarantined": sum(self.quarantined.values()),
            "quarantined_by_reason": {str(r): n for r, n in sorted(self.quarantined.items())},
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "drops_done": self.drops_done,
            "drops_waiting": self.drops_waiting,
            "sources_changed": self.sources_changed,
            "discarded": self.discarded,
        }

    def drop_lines(self) -> list[str]:
        """One line per drop this run handled or saw waiting, by keyed id (no names)."""
        lines = []
        for key, c in sorted(self.drops.items()):
            reasons: Counter[str] = Counter(r for _, r in self.rejected.get(key, []))
            why = ", ".join(f"{r}={n}" for r, n in sorted(reasons.items()))
            lines.append(
                f"{key}: {c.ingested} ingested, {c.duplicates} duplicates,"
                f" {c.quarantined} quarantined" + (f" ({why})" if why else "")
            )
        lines += [f"{key}: waiting, {why}" for key, why in sorted(self.waiting.items())]
        return lines

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
    sha256: str  # "": a large file hashed as it is encrypted (see _Batch.read_one)
    data: bytes | None  # None: too big to keep, re-read from the source
    header: DicomHeader | None = None
    quarantine_id: str = ""  # deterministic, so a rerun finds an earlier quarantine
    token: str | None = None  # which bytes were read (Location.change_token)
    changed: bool = False  # the source changed while it was read: left for the next run


_Rejected = tuple[_Read, QuarantineReason, str]  # a file, why, and a PHI-free detail


class _SourceReadError(Exception):
    """A source's OSError while it was encrypted, told apart from the vault's own."""

    def __init__(self, exc: OSError) -> None:
        super().__init__("a dropped file could not be read")
        self.exc = exc


class _SourceReads:
    """A source handle whose read errors are :class:`_SourceReadError`."""

    def __init__(self, src: IO[bytes]) -> None:
        self._src = src

    def read(self, size: int = -1) -> bytes:
        try:
            return self._src.read(size)
        except OSError as exc:
            raise _SourceReadError(exc) from exc


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


def remove_sources(home: Home, work: list[tuple[Drop, DropFile]], names: list[str]) -> int:
    """Delete the handled sources that a fresh listing shows unchanged; returns how many
    were left in place because they changed since they were listed."""
    if not names:
        return 0
    # Files with a problem were never read (nor are they removed): a real file can share
    # the name of one (an archive's refused member is reported under a stand-in name).
    listed: dict[str, DropFile] = {f.name: f for _, f in work if not f.problem}
    prefixes = sorted({d.folder for d, _ in work})
    current = {e.name: e for prefix in prefixes for e in home.drops.list(prefix, unchecked=True)}
    changed = 0
    for name in names:
        now = current.get(name)
        if now is None:
            continue  # already gone (another run, or an earlier attempt of this one)
        if not listed[name].unchanged(now):
            changed += 1
            continue
        try:
            home.drops.delete(name, unchecked=True)
        except OSError as exc:
            if not is_file_problem(exc):
                raise
            # Cataloged, but the source cannot be removed (an immutable file, a read-only
            # folder): it stays, and the next run counts it a duplicate and tries again.
            changed += 1
    return changed


@dataclass
class _Known:
    """What the catalog knows of a batch, read on one connection (see :func:`_existing`)."""

    sha: dict[str, str]  # instance sha by UID
    study_keys: dict[str, str]  # record key id by study UID
    quarantine: set[str]  # known quarantine ids
    deleted_studies: set[str]  # study UIDs an owner deleted (tombstoned)
    deleted_keys: set[str]  # of the keyed UIDs asked about, those of deleted studies,
    # series or instances


def _existing(
    home: Home, uids: list[str], studies: list[str], qids: list[str], uid_keys: set[str]
) -> _Known:
    """Catalog look-ups for a batch, on one read-only connection."""
    if not uids and not studies and not qids and not uid_keys:
        return _Known({}, {}, set(), set(), set())
    keys = {study_key(home.pepper, s): s for s in studies}
    asked = sorted(uid_keys)
    inst, stud, quar, tomb, gone = home.catalog.fetch(
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
            (
                "SELECT study_key AS k FROM tombstones"
                " WHERE study_key IN (SELECT unnest(?::VARCHAR[]))"
                " UNION SELECT uid_key FROM tombstone_uids"
                " WHERE uid_key IN (SELECT unnest(?::VARCHAR[]))",
                [asked, asked],
            ),
        ]
    )
    return _Known(
        dict(inst),
        dict(stud),
        {q for (q,) in quar},
        {keys[k] for (k,) in tomb},
        {k for (k,) in gone},
    )


def _check(item: _Read) -> tuple[QuarantineReason, str] | None:
    """The quarantine reason for a file, or None when it is a valid DICOM file."""
    drop, f = item.drop, item.file
    if not f.safe:
        return QuarantineReason.UNSAFE_NAME, "file name escapes its drop"
    if f.verdict:
        return QuarantineReason(f.verdict), f.verdict_detail
    if drop.state == "incomplete":
        return QuarantineReason.INCOMPLETE_DROP, drop.why or "manifest never completed"
    if f.expected_sha256 and item.sha256 and f.expected_sha256 != item.sha256:
        return QuarantineReason.CHECKSUM_MISMATCH, "SHA-256 differs from the manifest"
    return None


@dataclass
class _Sealed:
    """One fresh instance planned for the vault: its source, header and object id."""

    item: _Read
    header: DicomHeader
    object_id: str

    @property
    def name(self) -> str:
        return Vault.object_name(self.object_id)


class _Batch:
    """One batch's state through the named stages of :func:`ingest_batch`.

    Stages, in the crash-safe order of this module's docstring: :meth:`read`,
    :meth:`parse`, :meth:`classify`, :meth:`plan`, :meth:`seal`, :meth:`sync`,
    :meth:`commit`, :meth:`settle`, :meth:`remove`.
    """

    def __init__(
        self,
        home: Home,
        work: list[tuple[Drop, DropFile]],
        now: datetime,
        max_file_bytes: int,
        cd_extras: str = "keep",
        one_pass: bool = True,
    ) -> None:
        self.home = home
        self.cd_extras = cd_extras
        self.one_pass = one_pass and home.drops.has_change_tokens
        # Large files taken out of this batch for the two-pass path (see read_one).
        self.deferred: list[tuple[Drop, DropFile]] = []
        self.work = work
        self.now = now
        self.max_file_bytes = max_file_bytes
        self.vault: Vault = home.vault_store()
        self.stats = IngestStats()
        self.quarantined: list[Quarantined] = []
        # drop, file, qid, detail, reason: files reported without being read or stored
        self.unreadable: list[tuple[Drop, DropFile, str, str, QuarantineReason]] = []
        self.known_quarantine: set[str] = set()
        self.to_remove: list[str] = []
        self.to_quarantine: list[tuple[_Read, QuarantineReason, str, str | None]] = []
        self.uid_keys: dict[str, set[str]] = {}  # quarantine id -> keyed UIDs its bytes name
        self.late: list[Quarantined] = []  # copies of a study deleted since stage 2
        self.study_keys: dict[str, str] = {}  # study UID -> record key id
        self.new_studies: dict[str, dict[str, Any]] = {}
        self.instance_rows: list[dict[str, Any]] = []
        self.object_rows: list[dict[str, Any]] = []
        self.source_of: dict[str, _Read] = {}  # object id -> what it was read from
        self.written: list[str] = []  # object names planned for the vault
        self.pending: str | None = None  # the pending record naming them

    # -- bytes of one file ---------------------------------------------------

    def open_source(self, item: _Read) -> IO[bytes]:
        if item.data is not None:
            return io.BytesIO(item.data)
        return self.home.drops.open(item.file.name, unchecked=True)

    def read_one(self, drop: Drop, f: DropFile) -> _Read:
        drops = self.home.drops
        if f.size <= IN_MEMORY_MAX:
            # No more than the listed size and a byte: a file grown since is not the one
            # listed (and may be far past the in-memory limit).
            data = drops.read_bytes(f.name, unchecked=True, limit=f.size + 1)
            item = _Read(drop, f, hashlib.sha256(data).hexdigest(), data)
            item.changed = len(data) != f.size
        elif self.one_pass:
            # Hashed while it is encrypted (seal): one pass over its bytes. Only a plainly
            # new image stays on this path; anything else is deferred to the two-pass one.
            return _Read(drop, f, "", None)
        else:
            # Its bytes are read three times (hash, header, encryption): each read names the
            # same file (or object version) as this one, or the file is left for later.
            with drops.open(f.name, unchecked=True) as src:
                token = drops.change_token(src)
                item = _Read(drop, f, _hash_stream(src), None, token=token)
                item.changed = drops.change_token(src) != token
        item.quarantine_id = quarantine_id(
            self.home.pepper, drop.facility_id, drop.drop_id, f.name, item.sha256
        )
        return item

    def left(self, item: _Read) -> None:
        """A source that changed while it was read: nothing of it is kept or removed now,
        and the next run's listing sees it as it is then."""
        self.stats.sources_changed += 1

    def vanished(self, item: _Read) -> None:
        """A source gone since the listing (another run took it): not counted as seen."""
        self.stats.files_seen -= 1
        self.stats.count(item.drop, "files_seen", -1)

    def source_failed(self, item: _Read, exc: OSError, *, reportable: bool) -> None:
        """A large source that failed to open or read after the listing, once its bytes were
        needed again: gone, changed, or unreadable now (reported as such while the batch
        can still report it, else left for the next run). Any other error is the store's
        trouble and stops the batch, for the task to retry."""
        if isinstance(exc, FileNotFoundError):
            self.vanished(item)
        elif not item.sha256 and (is_changed_source(exc) or is_file_problem(exc)):
            self.defer(item)  # the two-pass batch decides (and reports it if unreadable)
        elif is_file_problem(exc) and reportable:
            drop, f = item.drop, item.file
            pepper = self.home.pepper
            qid = unreadable_id(pepper, drop.facility_id, drop.drop_id, f.name, f.size, f.mtime)
            self.unreadable.append((drop, f, qid, read_problem(exc), QuarantineReason.UNREADABLE))
        elif is_changed_source(exc) or is_file_problem(exc):
            self.left(item)
        else:
            raise exc

    def defer(self, item: _Read) -> None:
        """Take a large file not yet hashed out of this batch: a later batch in the same
        task hashes it first, then classifies it (duplicate, conflict, quarantine)."""
        self.deferred.append((item.drop, item.file))
        self.stats.files_seen -= 1
        self.stats.count(item.drop, "files_seen", -1)

    # -- quarantine ----------------------------------------------------------

    def quarantine(
        self, item: _Read, reason: QuarantineReason, detail: str, study_uid: str | None = None
    ) -> None:
        """Count a file as quarantined; :meth:`write_quarantine` stores it later."""
        if item.file.expected_uid:
            # A CD's referenced file: the UID its DICOMDIR record names finds it too, so a
            # rerun after a stop counts the reference handled (drops._resume_started).
            keys = self.uid_keys.setdefault(item.quarantine_id, set())
            keys.add(study_key(self.home.pepper, item.file.expected_uid))
        self.stats.quarantined[reason] += 1
        self.stats.count(item.drop, "quarantined")
        self.stats.reject(item.drop, item.file.name, reason)
        if reason == QuarantineReason.DELETED_BY_OWNER:
            self.stats.count(item.drop, "shredded")
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
            if reason == QuarantineReason.DELETED_BY_OWNER:
                # Never stored under a live key: a PHI-free record, and the source goes.
                self.quarantined.append(
                    quarantine_shredded(
                        self.home,
                        facility_id=item.drop.facility_id,
                        drop_id=item.drop.drop_id,
                        qid=item.quarantine_id,
                        size=item.file.size,
                        sha256=item.sha256,
                        now=self.now,
                    )
                )
                self.known_quarantine.add(item.quarantine_id)
                continue
            stored = self._quarantine_copy(item, reason, detail, study_uid)
            if stored is not None:
                self.quarantined.append(stored)
                self.known_quarantine.add(item.quarantine_id)

    def _quarantine_copy(
        self, item: _Read, reason: QuarantineReason, detail: str, study_uid: str | None
    ) -> Quarantined | None:
        """Store a quarantined file's bytes: the version that was hashed (its id names that
        hash). A large source that changed or went since is withdrawn from the quarantine
        and left for the next run, so a later whole file is never taken for this copy."""
        drops = self.home.drops
        try:
            src = self.open_source(item)
        except OSError as exc:
            self.withdraw(item, reason, exc)
            return None
        with src:
            pinned = item.data is None
            if pinned and drops.change_token(src) != item.token:
                self.withdraw(item, reason, None)
                return None
            try:
                stored = quarantine_file(
                    self.home,
                    facility_id=item.drop.facility_id,
                    drop_id=item.drop.drop_id,
                    source_name=item.file.name,
                    src=cast(IO[bytes], _SourceReads(src)),
                    size=item.file.size,
                    sha256=item.sha256,
                    reason=reason,
                    detail=detail,
                    study_uid=study_uid,
                    now=self.now,
                )
            except _SourceReadError as err:
                self.withdraw(item, reason, err.exc)
                return None
            moved = pinned and drops.change_token(src) != item.token
        if moved or stored.row["sha256"] != item.sha256:
            drop = item.drop
            discard_stored(self.home, drop.facility_id, drop.drop_id, item.quarantine_id)
            self.withdraw(item, reason, None)
            return None
        return stored

    def withdraw(self, item: _Read, reason: QuarantineReason, exc: OSError | None) -> None:
        """Undo :meth:`quarantine` for a file whose bytes could not be kept as hashed: it is
        not counted, not named in the receipt, and not removed. ``exc``: why, if it failed
        to open or read (the store's own trouble is raised, for the task to retry)."""
        gone = isinstance(exc, FileNotFoundError)
        if exc is not None and not gone and not (is_changed_source(exc) or is_file_problem(exc)):
            raise exc
        stats = self.stats
        stats.quarantined[reason] -= 1
        stats.quarantined = +stats.quarantined  # no zero counts
        stats.count(item.drop, "quarantined", -1)
        named = stats.rejected[item.drop.key]
        named.remove((item.file.name, str(reason)))
        if not named:
            del stats.rejected[item.drop.key]
        self.to_remove.remove(item.file.name)
        if gone:
            self.vanished(item)
        else:
            self.left(item)

    # -- stage 1: read, hash and parse ----------------------------------------

    def read(self) -> list[_Read]:
        """Read and hash every file; each one fails on its own. A file that cannot be read
        (the listing's ``problem``, or an OSError now: permissions, a symlink put in its
        place, a path past the length limit) is noted for :meth:`report_unreadable`."""
        reads: list[_Read] = []
        for drop, f in self.work:
            detail, reason = f.problem, QuarantineReason(f.verdict or "unreadable")
            if not detail and f.size > self.max_file_bytes:
                # Not read at all (a sparse terabyte costs a facility nothing to drop, and
                # would cost the quarantine its size): reported once, left in place.
                detail = f"file is over the {self.max_file_bytes}-byte limit; left in its drop"
                reason = QuarantineReason.TOO_LARGE
            if not detail:
                try:
                    reads.append(self.read_one(drop, f))
                except FileNotFoundError:
                    continue  # vanished since the listing (another run took it)
                except OSError as exc:
                    if is_changed_source(exc):
                        self.stats.sources_changed += 1  # replaced while read: next run's
                    elif not is_file_problem(exc):
                        raise  # the store's trouble (a 503, an I/O error): the task retries
                    else:
                        detail = read_problem(exc)
            if detail:
                qid = unreadable_id(
                    self.home.pepper, drop.facility_id, drop.drop_id, f.name, f.size, f.mtime
                )
                self.unreadable.append((drop, f, qid, detail, reason))
            self.stats.files_seen += 1
            self.stats.count(drop, "files_seen")
        return reads

    def report_unreadable(self) -> None:
        """Catalog rows for unreadable files not reported before; the files stay in place."""
        for drop, f, qid, detail, reason in self.unreadable:
            if qid in self.known_quarantine:
                continue  # reported by an earlier run, unchanged since
            self.known_quarantine.add(qid)
            self.stats.quarantined[reason] += 1
            self.stats.count(drop, "quarantined")
            self.stats.reject(drop, f.name, reason)
            self.quarantined.append(
                quarantine_unreadable(
                    self.home,
                    facility_id=drop.facility_id,
                    drop_id=drop.drop_id,
                    qid=qid,
                    size=f.size,
                    detail=detail,
                    now=self.now,
                    reason=reason,
                )
            )

    def parse(self, reads: list[_Read]) -> tuple[list[_Read], list[_Rejected]]:
        """``(parsed, rejected)``: parsed items carry their header; rejected ones a reason."""
        parsed: list[_Read] = []
        rejected: list[_Rejected] = []
        for item in reads:
            if item.changed:
                self.left(item)  # changed while it was hashed
                continue
            problem = _check(item)
            if problem is not None and not item.sha256:
                self.defer(item)  # a quarantined file is named by its hash
                continue
            if problem is not None:
                rejected.append((item, *problem))
                continue
            try:
                if item.data is not None:
                    item.header = header_from_bytes(item.data)
                elif not self._parse_large(item):
                    continue
                parsed.append(item)
            except OSError as exc:
                self.source_failed(item, exc, reportable=True)
            except DicomRejected as exc:
                if not item.sha256:
                    self.defer(item)
                elif item.file.extra and exc.reason == QuarantineReason.NOT_DICOM:
                    # A CD's viewer, autorun.inf or README: an extra, not a bad image.
                    if self.cd_extras == "discard":
                        self.discard(item)
                        continue
                    rejected.append((item, QuarantineReason.CD_EXTRA, "not an image of the CD"))
                else:
                    rejected.append((item, exc.reason, exc.detail))
        return parsed, rejected

    def _parse_large(self, item: _Read) -> bool:
        """Parse a large file's header from its source; False when it was taken out of the
        batch (deferred, or changed since it was hashed)."""
        drops = self.home.drops
        with self.open_source(item) as fp:
            token = drops.change_token(fp)
            if not item.sha256:
                item.token = token
            elif item.changed or token != item.token:
                self.left(item)  # hashed in read_one from other bytes
                return False
            rejected: DicomRejected | None = None
            try:
                item.header = read_header(fp, item.file.size)
            except DicomRejected as exc:
                rejected = exc
            if item.sha256 and drops.change_token(fp) != item.token:
                self.left(item)  # the header and the hash came from other bytes
                return False
            if rejected is not None:
                raise rejected
        if not item.sha256 and item.token is None:
            self.defer(item)  # no way to tell it unchanged by the encryption
            return False
        return True

    def discard(self, item: _Read) -> None:
        """A CD extra under ``cd_extras="discard"``: counted and named in the receipt, then
        its source removed; nothing of it is kept."""
        self.stats.discarded += 1
        self.stats.count(item.drop, "discarded")
        self.stats.reject(item.drop, item.file.name, "discarded")
        self.to_remove.append(item.file.name)

    # -- stage 2: dedupe against the catalog and within the batch --------------

    def traces(self, item: _Read) -> tuple[str | None, set[str]]:
        """The study a rejected file names, when its first bytes parse that far, and every
        UID its bytes hold: deletion finds the quarantined copy by either."""
        try:
            with self.open_source(item) as src:
                hint = study_uid_hint(src.read(HINT_BYTES))
                src.seek(0)
                return hint, uids_named(src)
        except OSError:
            return None, set()  # gone or unreadable now: quarantined without a hint

    def classify(
        self, reads: list[_Read], parsed: list[_Read], rejected: list[_Rejected]
    ) -> list[tuple[_Read, DicomHeader]]:
        """Quarantine the rejected, count duplicates, and return the fresh instances."""
        headers = [r.header for r in parsed if r.header is not None]
        traces = [self.traces(item) for item, _, _ in rejected]
        pepper = self.home.pepper
        uid_keys = [{study_key(pepper, u) for u in uids} for _, uids in traces]
        # A file bearing a deleted instance's UID is a copy of it, whatever study UID it
        # claims now.
        copy_keys = {h.sop_instance_uid: {study_key(pepper, h.sop_instance_uid)} for h in headers}
        known = _existing(
            self.home,
            [h.sop_instance_uid for h in headers],
            sorted({h.study_uid for h in headers}),
            [r.quarantine_id for r in reads if r.quarantine_id] + [u[2] for u in self.unreadable],
            set().union(*uid_keys, *copy_keys.values()),
        )
        known_sha, self.study_keys, self.known_quarantine = (
            known.sha,
            known.study_keys,
            known.quarantine,
        )
        deleted, deleted_keys = known.deleted_studies, known.deleted_keys
        self.report_unreadable()
        for (item, reason, detail), (hint, _), keys in zip(rejected, traces, uid_keys, strict=True):
            if keys & deleted_keys:
                # A damaged copy of a study its owner deleted (it names the study, one of
                # its series or instances): kept no more than a whole one.
                self.quarantine(item, QuarantineReason.DELETED_BY_OWNER, "study was deleted")
            else:
                self.uid_keys[item.quarantine_id] = keys
                self.quarantine(item, reason, detail, hint)
        fresh: list[tuple[_Read, DicomHeader]] = []
        seen: dict[str, str] = dict(known_sha)
        for item in parsed:
            header = item.header
            assert header is not None  # noqa: S101 - parsed items have headers
            prior = seen.get(header.sop_instance_uid)
            expected = item.file.expected_uid
            gone = header.study_uid in deleted or copy_keys[header.sop_instance_uid] & deleted_keys
            if (not item.sha256 or prior == "") and (
                prior is not None or gone or (expected and expected != header.sop_instance_uid)
            ):
                self.defer(item)  # deciding needs its hash (or the unhashed one's)
            elif expected and expected != header.sop_instance_uid and not gone:
                self.quarantine(
                    item,
                    QuarantineReason.DICOMDIR_MISMATCH,
                    "SOP Instance UID differs from its DICOMDIR record",
                    header.study_uid,
                )
            elif gone:
                # The owner deleted this study while the file was on its way: the tombstone wins.
                self.quarantine(
                    item, QuarantineReason.DELETED_BY_OWNER, "study was deleted by its owner"
                )
            elif prior is None:
                seen[header.sop_instance_uid] = item.sha256
                fresh.append((item, header))
            elif prior == item.sha256:
                self.stats.duplicates += 1
                self.stats.count(item.drop, "duplicates")
                self.to_remove.append(item.file.name)
            else:
                # Its UIDs, keyed: deletion of the study it claims to be a copy of takes it.
                self.uid_keys[item.quarantine_id] = {
                    study_key(self.home.pepper, u)
                    for u in (header.study_uid, header.sop_instance_uid)
                }
                self.quarantine(
                    item,
                    QuarantineReason.UID_CONFLICT,
                    "SOP Instance UID known with other content",
                    header.study_uid,
                )
        return fresh

    # -- stage 3a: record keys, study rows, the pending record -----------------

    def plan(self, fresh: list[tuple[_Read, DicomHeader]]) -> list[_Sealed]:
        """New studies get a record key (one keystore transaction); every object is named in
        a pending record before any is written, so a batch stopped from here on leaves a
        record that the next run's reconcile settles without listing the whole vault."""
        home = self.home
        new_study_uids = sorted({h.study_uid for _, h in fresh} - set(self.study_keys))
        new_keys = dict(
            zip(new_study_uids, home.keystore.create_many(len(new_study_uids)), strict=True)
        )
        for item, header in fresh:
            if header.study_uid in new_keys and header.study_uid not in self.new_studies:
                key_id, record_key = new_keys[header.study_uid]
                self.study_keys[header.study_uid] = key_id
                self.new_studies[header.study_uid] = self._study_row(
                    item, header, key_id, record_key
                )
        planned = [_Sealed(item, header, uuid.uuid4().hex) for item, header in fresh]
        self.written = [p.name for p in planned]
        self.pending = record_pending(home, self.written, self.quarantine_names())
        self.write_quarantine()
        return planned

    def _study_row(
        self, item: _Read, header: DicomHeader, key_id: str, record_key: bytes
    ) -> dict[str, Any]:
        pkey = patient_key(self.home.pepper, header.issuer, header.patient_id)
        return {
            "study_uid": header.study_uid,
            "patient_key": pkey,
            "owner": item.drop.owners.get(header.study_uid) or f"patient:{pkey}",
            "facility_id": item.drop.facility_id,
            "record_key_id": key_id,
            "phi_enc": seal_fields(record_key, header.study_uid, header.phi()),
            "status": "active",
            "created_at": self.now,
        }

    # -- stage 3b: encrypt, write and read back --------------------------------

    def seal(self, planned: list[_Sealed]) -> None:
        """Encrypt each planned instance into the vault and verify it; a failed read-back or
        a source that changed while read leaves the file in the drop for the next run. So
        does a study key a deletion sweep destroyed since the plan: the next run finds the
        tombstone and treats the file as a late copy of a deleted study.

        A large object is read back on a helper thread while the next one is encrypted."""
        checks: list[tuple[_Sealed, str, Sealed, Future[None]]] = []
        for p in planned:
            key_id = self.study_keys[p.header.study_uid]
            try:
                sealed = self._put(p, key_id)
                if sealed is None:
                    continue
                if p.item.data is None:
                    checks.append(
                        (p, key_id, sealed, HELPERS.submit(self.vault.verify, p.name, sealed))
                    )
                    continue
                self.vault.verify(p.name, sealed)
            except (IntegrityError, KeyDestroyedError):
                continue
            self._sealed(p, key_id, sealed)
        for p, key_id, sealed, check in checks:
            try:
                check.result()
            except (IntegrityError, KeyDestroyedError):
                continue
            self._sealed(p, key_id, sealed)

    def _put(self, p: _Sealed, key_id: str) -> Sealed | None:
        """Encrypt one source; None when it is left out (changed, gone, or deferred). Only
        the source's own errors are caught here: the vault's stop the batch."""
        item = p.item
        hashed = bool(item.sha256)
        try:
            src = self.open_source(item)
        except OSError as exc:
            self.source_failed(item, exc, reportable=False)
            return None
        with src:
            _fault("mid_encrypt")
            drops = self.home.drops
            # The same bytes as the parse (and the hash) read: this handle and theirs name
            # one unchanged file or object version. In memory, the bytes are the batch's.
            pinned = item.data is None
            same = not pinned or drops.change_token(src) == item.token
            try:
                reads = cast(IO[bytes], _SourceReads(src))  # read() is all put uses
                sealed = self.vault.put(p.name, reads, key_id, fresh=True)
            except _SourceReadError as err:
                self.source_failed(item, err.exc, reportable=False)
                return None
            same = same and (not pinned or drops.change_token(src) == item.token)
        # A source cut or grown since the listing is not the file listed either.
        if not same or sealed.plaintext_bytes != item.file.size:
            self.defer(item) if not hashed else self.left(item)
            return None
        if hashed:
            if sealed.sha256 != item.sha256:
                self.left(item)
                return None
            return sealed
        expected = item.file.expected_sha256
        if expected and expected != sealed.sha256:
            self.defer(item)  # quarantined there, named by its hash
            return None
        item.sha256 = sealed.sha256
        item.quarantine_id = quarantine_id(
            self.home.pepper, item.drop.facility_id, item.drop.drop_id, item.file.name, item.sha256
        )
        return sealed

    def _sealed(self, p: _Sealed, key_id: str, sealed: Sealed) -> None:
        self.source_of[p.object_id] = p.item
        self.object_rows.append(self._object_row(p, key_id, sealed))
        self.instance_rows.append(self._instance_row(p))

    def _object_row(self, p: _Sealed, key_id: str, sealed: Sealed) -> dict[str, Any]:
        return object_row(
            object_id=p.object_id,
            kind="instance",
            location=self.home.vault,
            region=self.home.region,
            name=p.name,
            record_key_id=key_id,
            sealed=sealed,
            created_at=self.now,
        )

    def _instance_row(self, p: _Sealed) -> dict[str, Any]:
        header = p.header
        return {
            "sop_instance_uid": header.sop_instance_uid,
            "study_uid": header.study_uid,
            "series_uid": header.series_uid,
            "sop_class_uid": header.sop_class_uid,
            "modality": header.modality,
            "transfer_syntax": header.transfer_syntax,
            "rows": header.rows,
            "columns": header.columns,
            "frames": header.frames,
            "facility_id": p.item.drop.facility_id,
            "drop_id": p.item.drop.drop_id,
            "object_id": p.object_id,
            "sha256": p.item.sha256,
            "size_bytes": p.item.file.size,
            "ingested_at": self.now,
        }

    def sync(self) -> None:
        """Durable before cataloged: the sources go once the commit lands."""
        self.home.vault.flush()
        if self.quarantined:
            self.home.quarantine.flush()

    # -- stage 4: one transaction ---------------------------------------------

    def commit(self, con: duckdb.DuckDBPyConnection) -> set[str]:
        """Catalog the batch; returns the UIDs left out (raced or deleted meanwhile)."""
        taken = self._taken(con)
        self.late = self._deleted_meanwhile(con)
        late = {q.quarantine_id for q in self.late}
        quarantined = [
            self._as_shredded(q) if q.quarantine_id in late else q for q in self.quarantined
        ]
        keep = [r for r in self.instance_rows if r["sop_instance_uid"] not in taken]
        keep_ids = {r["object_id"] for r in keep}
        # Bump the studies we add to: a sweep marking one of them conflicts with this
        # transaction instead of racing it (see schema/005_study_revision.sql).
        grown = sorted({r["study_uid"] for r in keep} - set(self.new_studies))
        if grown:
            con.execute(
                "UPDATE studies SET rev = rev + 1 WHERE study_uid IN (SELECT unnest(?::VARCHAR[]))",
                [grown],
            )
        facilities = sorted({d.facility_id for d, _ in self.work})
        insert_rows(
            con,
            "facilities",
            [{"facility_id": f, "first_seen_at": self.now} for f in facilities],
            ignore_existing=True,
        )
        insert_rows(con, "studies", list(self.new_studies.values()), ignore_existing=True)
        insert_rows(con, "objects", [o for o in self.object_rows if o["object_id"] in keep_ids])
        insert_rows(con, "instances", keep)
        stored = [q.object_row for q in quarantined if q.object_row is not None]
        insert_rows(con, "objects", stored, ignore_existing=True)
        insert_rows(con, "quarantine", [q.row for q in quarantined], ignore_existing=True)
        insert_rows(
            con,
            "quarantine_uids",
            [
                {"quarantine_id": q.quarantine_id, "uid_key": k}
                for q in quarantined
                if q.object_row is not None
                for k in sorted(self.uid_keys.get(q.quarantine_id, ()))
            ],
            ignore_existing=True,
        )
        _fault("mid_commit")
        self._audit(con, len(keep), len(taken))
        return taken

    def _deleted_meanwhile(self, con: duckdb.DuckDBPyConnection) -> list[Quarantined]:
        """Re-checked inside the transaction: quarantined copies (stored since stage 2) of a
        study its owner deleted meanwhile; they are recorded shredded, not stored."""
        pepper = self.home.pepper
        keys_of = {
            q.quarantine_id: self.uid_keys.get(q.quarantine_id, set())
            | ({study_key(pepper, q.row["study_uid"])} if q.row["study_uid"] else set())
            for q in self.quarantined
            if q.object_row is not None
        }
        wanted = sorted(set().union(*keys_of.values()))
        if not wanted:
            return []
        hit = {
            row[0]
            for row in con.execute(
                "SELECT study_key FROM tombstones WHERE study_key IN (SELECT unnest(?::VARCHAR[]))"
                " UNION SELECT uid_key FROM tombstone_uids"
                " WHERE uid_key IN (SELECT unnest(?::VARCHAR[]))",
                [wanted, wanted],
            ).fetchall()
        }
        return [q for q in self.quarantined if keys_of.get(q.quarantine_id, set()) & hit]

    def _as_shredded(self, q: Quarantined) -> Quarantined:
        return quarantine_shredded(
            self.home,
            facility_id=q.row["facility_id"],
            drop_id=q.row["drop_id"],
            qid=q.quarantine_id,
            size=q.row["size_bytes"],
            sha256=q.row["sha256"],
            now=self.now,
        )

    def shred_late(self) -> None:
        """After the commit: the copies :meth:`_deleted_meanwhile` found lose their key and
        their bytes (a run stopped before this leaves objects no row names, which the
        pending record's reconcile deletes), and count as ``deleted_by_owner``."""
        if not self.late:
            return
        stored = [(q, q.object_row) for q in self.late if q.object_row is not None]
        self.home.keystore.destroy(sorted({str(o["record_key_id"]) for _, o in stored}))
        for q, obj in stored:
            name = str(obj["name"])
            self.home.quarantine.delete(name)
            self.home.quarantine.delete(name[: -len(".dvlt")] + ".json")
            self.stats.quarantined[q.reason] -= 1
            if self.stats.quarantined[q.reason] <= 0:
                del self.stats.quarantined[q.reason]
            self.stats.quarantined[QuarantineReason.DELETED_BY_OWNER] += 1
            key = f"{q.row['facility_id']}/{q.row['drop_id']}"
            self.stats.drops.setdefault(key, DropCounts()).shredded += 1

    def _taken(self, con: duckdb.DuckDBPyConnection) -> set[str]:
        """Re-checked inside the transaction: UIDs a concurrent run cataloged since stage 2,
        and those of studies deleted since (their sources stay for the next run)."""
        pepper = self.home.pepper
        uids_now = [r["sop_instance_uid"] for r in self.instance_rows]
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
                [[study_key(pepper, r["study_uid"]) for r in self.instance_rows]],
            ).fetchall()
        }
        return taken | {
            r["sop_instance_uid"]
            for r in self.instance_rows
            if study_key(pepper, r["study_uid"]) in tombstoned
        }

    def _audit(self, con: duckdb.DuckDBPyConnection, ingested: int, left: int) -> None:
        stats = self.stats
        audit(
            con,
            actor="ingest",
            action="ingest_batch",
            subject=",".join(sorted(stats.drops)),
            detail={
                "files": stats.files_seen,
                "ingested": ingested,
                "duplicates": stats.duplicates,
                "left_for_retry": left,
                "quarantined": dict(stats.quarantined),
            },
            at=self.now,
        )

    # -- after the commit ------------------------------------------------------

    def settle(self, raced: set[str]) -> list[dict[str, Any]]:
        """Hand raced files back, delete objects no row names, clear the pending record, and
        count what was committed; returns the committed instance rows."""
        stats = self.stats
        committed = [r for r in self.instance_rows if r["sop_instance_uid"] not in raced]
        for row in self.instance_rows:
            if row["sop_instance_uid"] in raced:
                # Another batch cataloged it meanwhile: a later batch classifies the source
                # (duplicate or conflict). Its copy goes below.
                item = self.source_of[row["object_id"]]
                stats.files_seen -= 1
                stats.count(item.drop, "files_seen", -1)
                stats.retry.append((item.drop, item.file))
        cataloged = {Vault.object_name(r["object_id"]) for r in committed}
        for name in self.written:
            if name not in cataloged:  # raced, failed its read-back, or its source changed
                self.vault.location.delete(name)
        self.shred_late()
        clear_pending(self.home, self.pending)
        for row in committed:
            item = self.source_of[row["object_id"]]
            stats.count(item.drop, "ingested")
            stats.count(item.drop, "bytes", row["size_bytes"])
        stats.ingested = len(committed)
        stats.bytes = sum(r["size_bytes"] for r in committed)
        return committed

    def remove(self, committed: list[dict[str, Any]]) -> None:
        """Stage 5: only now remove the sources, and only those still as they were listed: a
        facility may have replaced one meanwhile, and the new object is the next run's."""
        done = [self.source_of[r["object_id"]].file.name for r in committed]
        self.stats.sources_changed += remove_sources(self.home, self.work, self.to_remove + done)


def ingest_batch(
    home: Home,
    work: list[tuple[Drop, DropFile]],
    *,
    max_file_bytes: int,
    now: datetime | None = None,
    cpu_turn: AbstractContextManager[object] | None = None,
    cd_extras: str = "keep",
    one_pass: bool = True,
) -> IngestStats:
    """Ingest a batch of files (from one or more drops). Safe to rerun after a crash anywhere:
    the stages run in the order of this module's docstring.

    ``one_pass``: a file too large to keep in memory is hashed while it is encrypted, so
    its bytes are read once (and once more by the read-back), where the drops' store can
    tell a changed source (:meth:`Location.change_token`: local disk, S3). Only a plainly
    new image takes that path; one whose UID is known or repeated, whose header is
    rejected, whose manifest checksum differs or whose source changed is deferred, and a
    second batch in this call, after this one's commit, hashes it first as before.

    ``cpu_turn`` (a lock shared by the batches one run has in flight) is held while the
    batch reads, parses, looks up and plans its files, and released before it encrypts,
    writes, syncs and commits, so one batch parses while the one before it writes.
    ``cd_extras`` (``keep`` or ``discard``): what becomes of a CD's files that are not images.
    """
    started = time.perf_counter()
    batch = _Batch(home, work, now or datetime.now(UTC), max_file_bytes, cd_extras, one_pass)
    with cpu_turn if cpu_turn is not None else nullcontext():
        reads = batch.read()
        parsed, rejected = batch.parse(reads)
        _fault("after_parse")
        planned = batch.plan(batch.classify(reads, parsed, rejected))
    # Creating a file is mostly kernel time, which the other batch's parse can overlap.
    batch.seal(planned)
    _fault("after_vault_write")
    _fault("before_sync")
    batch.sync()
    committed = batch.settle(home.catalog.write(batch.commit))
    _fault("after_commit")
    batch.remove(committed)
    if batch.deferred:
        batch.stats.add(
            ingest_batch(
                home,
                batch.deferred,
                max_file_bytes=max_file_bytes,
                now=now,
                cpu_turn=cpu_turn,
                cd_extras=cd_extras,
                one_pass=False,
            )
        )
    batch.stats.seconds = time.perf_counter() - started
    return batch.stats


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

    # A drop that brought files of a deleted study: its folder name can name the patient,
    # so it is not kept (a new drop's is never sealed; a known one's key is destroyed).
    shredded = {k for k, c in stats.drops.items() if c.shredded}
    new_names = _seal_new(home, [d for d in drops if d.key not in shredded])

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
        fresh = []
        for r in rows:
            row = dict(zip(names, r, strict=True))
            key_id, name_enc = new_names.get(f"{r[0]}/{r[1]}", (None, None))
            fresh.append({**row, "record_key_id": key_id, "name_enc": name_enc})
        insert_rows(con, "drops", fresh, ignore_existing=True)
        if shredded:
            where = " WHERE facility_id || '/' || drop_id IN (SELECT unnest(?::VARCHAR[]))"
            found = con.execute(
                "SELECT record_key_id FROM drops" + where + " AND record_key_id IS NOT NULL",  # noqa: S608
                [sorted(shredded)],
            ).fetchall()
            keys.update(r[0] for r in found)
            con.execute("UPDATE drops SET name_enc = NULL" + where, [sorted(shredded)])  # noqa: S608

    keys: set[str] = set()
    if rows:
        home.catalog.write(work)
        home.keystore.destroy(sorted(keys))


def _seal_new(home: Home, drops: list[Drop]) -> dict[str, tuple[str, bytes]]:
    """``{drop key: (record_key_id, name_enc)}`` for the drops the catalog does not know
    yet: a new drop's folder name is kept only sealed, under a record key of its own."""
    if not drops:
        return {}
    known = home.catalog.query(
        "SELECT facility_id || '/' || drop_id AS k FROM drops"
        " WHERE facility_id || '/' || drop_id IN (SELECT unnest(?::VARCHAR[]))",
        [[d.key for d in drops]],
    )
    new = [d for d in drops if d.key not in set(known["k"])]
    sealed = seal_names(home.keystore, [(d.drop_id, d.name) for d in new])
    return {d.key: s for d, s in zip(new, sealed, strict=True)}


def finish_drops(home: Home, drops: list[Drop]) -> dict[str, bool]:
    """Remove manifests and empty folders of drops whose every file is handled."""
    finished = {}
    for drop in drops:
        try:
            finished[drop.key] = _finish(home, drop)
        except FileNotFoundError:
            finished[drop.key] = True  # gone already (another run finished it)
        except OSError as exc:
            if not is_file_problem(exc):
                raise  # the store's trouble: the task retries
            # A folder the service account cannot empty (read-only, not a folder at all):
            # the drop stays partial and is recorded; the error's path is not repeated.
            problem = read_problem(exc)
            log.warning(
                "drop %s/%s cannot be cleaned up (%s)", drop.facility_id, drop.drop_id, problem
            )
            finished[drop.key] = False
    return finished


def _finish(home: Home, drop: Drop) -> bool:
    """Done when only the drop's bookkeeping is left: its manifest, its DICOMDIRs, and the
    archives it unpacked (each member handled, so each archive is accounted for). Those
    go last, archives first, so a run stopped here unpacks what is left again."""
    own = [*drop.unpacked, *drop.directories, *([drop.manifest_name] if drop.manifest_name else [])]
    listed = home.drops.list(drop.folder, unchecked=True)
    if [e for e in listed if e.name not in own]:
        return False
    archives = {f.name: f for f in drop.archives_listed}
    if any(e.name in archives and not archives[e.name].unchanged(e) for e in listed):
        return False  # an archive re-sent under its name since it was unpacked: next run's
    present = {e.name for e in listed}
    for name in own:
        if name in present:
            home.drops.delete(name, unchecked=True)
    home.drops.rmdir_empty(drop.folder, unchecked=True)
    return True


# Prefect wrappers: one task run per batch (a task run costs ~5 ms; per-file work is plain
# Python). Batches are idempotent, so retrying one after an I/O error is safe.
ingest_batch_task = task(
    name="ingest-batch",
    retries=2,
    retry_condition_fn=retry_transient,
    retry_delay_seconds=[1, 5],
    cache_policy=NO_CACHE,
)(ingest_batch)
record_drops_task = task(
    name="record-drops",
    retries=3,
    retry_condition_fn=retry_transient,
    retry_delay_seconds=[1, 2, 5],
    cache_policy=NO_CACHE,
)(record_drops)
finish_drops_task = task(
    name="finish-drops",
    retries=3,
    retry_condition_fn=retry_transient,
    retry_delay_seconds=[1, 2, 5],
    cache_policy=NO_CACHE,
)(finish_drops)
