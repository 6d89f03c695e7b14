"""Finding drops and deciding when each is ready.

A drop is ``{drops}/{facility_id}/{folder name}/...``. Its folder name can be PHI, so the
catalog, logs and quarantine know it by a keyed id (``drop_id``, see
:mod:`dropvault.tasks.drop_names`). It is ready when:

* it has a ``manifest.json`` and every file the manifest lists is present
  with the listed size (files the manifest does not list must also be quiet);
* or it has no manifest and no file in it changed for ``quiet_seconds``.

A manifest drop that is still missing or short of a listed file after
``incomplete_seconds`` (counted from the manifest's mtime) is *incomplete*:
its files are quarantined with reason ``incomplete_drop``.

A listed file can also be missing because an earlier pass handled it: passes remove
each source once it is cataloged, so a drop that a crash or a lost commit race left
half done is missing the files already taken. Given the catalog, :func:`scan_drops`
counts such a drop ready when the catalog accounts for every missing file: it knows
the drop (an earlier pass recorded it) or the file's listed SHA-256 (cataloged or
quarantined). Without this, the rest of the drop would wait until it went
*incomplete* and be quarantined.

Manifest format (JSON)::

    {"files": [{"path": "series1/img001.dcm", "size": 39206, "sha256": "<hex>"}, ...],
     "owners": {"<StudyInstanceUID>": "<owner account>", ...}}

``owners`` is optional; a study it does not name is owned by
``patient:<patient_key>``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from typing import Literal

from prefect import task
from prefect.cache_policies import NO_CACHE

from dropvault.storage.catalog import Catalog
from dropvault.storage.errors import retry_transient
from dropvault.storage.locations import Entry, Location, is_file_problem, is_safe_name
from dropvault.tasks.dicom.dicomdir import MAX_BYTES as DICOMDIR_MAX
from dropvault.tasks.dicom.dicomdir import NAME as DICOMDIR_NAME
from dropvault.tasks.dicom.dicomdir import Directory, is_dicomdir_name, read_dicomdir
from dropvault.tasks.drop_names import drop_id_for
from dropvault.tasks.layout import RECEIPTS
from dropvault.tasks.phi import study_key

MANIFEST = "manifest.json"
# ``{drops}/{facility}/_receipts/``: what each drop did, for the facility to read
# (``dropvault.tasks.receipts``). A drop folder of that name is never a drop.
# ~150,000 listed files; a larger one is malformed. It is read whole every scan while
# its drop waits (~60 MB parsed at the limit).
MAX_MANIFEST_BYTES = 16 << 20
# A listed file takes ~100 bytes and 4 of "{[,": json builds an object per value, so a
# manifest denser in values than 1 in 10 bytes is refused before it is parsed (8 MiB of
# "{}," once cost 320 MB every scan).
MIN_BYTES_PER_VALUE = 10
MAX_DIRECTORIES = 4  # DICOMDIRs read per drop (a few CDs copied into one folder)
TMP_PREFIX = ".tmp-"

DropState = Literal["ready", "waiting", "incomplete"]


@dataclass(frozen=True)
class DropFile:
    name: str  # as listed, relative to the drops root (may be unsafe: see ``safe``)
    size: int
    mtime: float
    expected_sha256: str | None = None
    safe: bool = True
    tag: str = ""  # ETag as listed: with size and mtime, tells a replaced object apart
    problem: str = ""  # set when the listing already shows it cannot be read (see Entry)
    # Decided before ingest reads it (a QuarantineReason and a PHI-free detail): an archive
    # refused whole, or an archive member that was not written (then ``problem`` is set).
    verdict: str = ""
    verdict_detail: str = ""
    expected_uid: str | None = None  # the SOP Instance UID its DICOMDIR record names
    extra: bool = False  # in a drop with a DICOMDIR that does not reference it (a CD's extras)

    def unchanged(self, entry: Entry) -> bool:
        """Whether a fresh listing still shows the object this file was listed as."""
        return (entry.size, entry.mtime, entry.tag) == (self.size, self.mtime, self.tag)


def file_from_entry(entry: Entry) -> DropFile:
    """A file of a drop as listed, with nothing (no manifest) to check it against."""
    return DropFile(
        entry.name,
        entry.size,
        entry.mtime,
        None,
        is_safe_name(entry.name),
        entry.tag,
        entry.problem,
    )


@dataclass
class Drop:
    facility_id: str
    drop_id: str  # keyed id (d_...): the folder name itself is never stored or logged
    files: list[DropFile]
    has_manifest: bool
    state: DropState
    why: str = ""  # PHI-free note on a waiting or incomplete drop
    owners: dict[str, str] = field(default_factory=dict)
    manifest_name: str | None = None
    absent: dict[str, str] = field(default_factory=dict)  # listed, not there: name -> sha256
    folder: str = ""  # where it is, as listed (raw); "" means facility_id/drop_id
    # For a drop that waits (status, receipts): the listed files missing or short, by their
    # names in the drop (the facility's own; PHI for the catalog, never logged), when its
    # first file arrived, and when it goes incomplete (None without a manifest).
    missing: tuple[str, ...] = ()
    first_seen: float = 0.0
    incomplete_at: float | None = None
    # Files that are the drop's own bookkeeping, removed when it is finished: its DICOMDIRs
    # (read as its table of contents) and the archives it unpacked (see tasks/archives.py).
    directories: tuple[str, ...] = ()
    references: int = 0  # files its DICOMDIRs reference
    unpacked: tuple[str, ...] = ()
    # The dropped archives among them as listed: one replaced since (a re-sent export.zip)
    # is not removed with the drop, but left for the next run to unpack.
    archives_listed: tuple[DropFile, ...] = ()
    # Referenced by a DICOMDIR but not here (name -> SOP Instance UID): a rerun finds them
    # cataloged when an earlier pass took them (see _resume_started).
    absent_uids: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.folder:
            self.folder = f"{self.facility_id}/{self.drop_id}"

    @property
    def name(self) -> str:
        """The folder's own name, as listed (PHI: only ever sealed)."""
        return self.folder.partition("/")[2]

    @property
    def key(self) -> str:
        return f"{self.facility_id}/{self.drop_id}"


def catalog_name(part: str) -> str:
    """A folder name as the catalog keeps it: as is when it is valid UTF-8, else a stable
    stand-in (the filesystem handed over bytes that are not text; they cannot be stored)."""
    try:
        part.encode("utf-8")
    except UnicodeEncodeError:
        raw = part.encode("utf-8", "surrogateescape")
        return "undecodable-" + hashlib.blake2b(raw, digest_size=8).hexdigest()
    return part


def _parse_manifest(raw: bytes) -> tuple[dict[str, tuple[int, str]], dict[str, str]]:
    """``({relative path: (size, sha256)}, owners)``; raises ValueError when malformed."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ValueError("manifest too large")
    values = raw.count(b"{") + raw.count(b"[") + raw.count(b",")
    if values * MIN_BYTES_PER_VALUE > len(raw) + 1024:
        raise ValueError("manifest has more values than its files")
    doc = json.loads(raw)
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), list):
        raise ValueError("manifest needs a 'files' list")
    listed: dict[str, tuple[int, str]] = {}
    for item in doc["files"]:
        if not isinstance(item, dict):
            raise ValueError("each manifest file is an object")
        path, size, sha = item.get("path"), item.get("size"), item.get("sha256")
        if not isinstance(path, str) or not isinstance(size, int) or not isinstance(sha, str):
            raise ValueError("each manifest file needs path, size and sha256")
        if not SHA256.fullmatch(sha):
            raise ValueError("a manifest sha256 is not 64 hex digits")
        listed[path] = (size, sha.lower())
    owners = doc.get("owners") or {}
    if not isinstance(owners, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and _text_ok(k) and _text_ok(v)
        for k, v in owners.items()
    ):
        raise ValueError("manifest 'owners' must map study UIDs to accounts")
    return listed, owners


SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _text_ok(value: str) -> bool:
    """Text the catalog can hold and a log can show: UTF-8, no control characters."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return not _CONTROL.search(value) and len(value) <= 1024


def scan_drops(
    drops: Location,
    pepper: bytes,
    now: float,
    quiet_seconds: float,
    incomplete_seconds: float,
    catalog: Catalog | None = None,
) -> list[Drop]:
    """Group the drops location's files into drops and decide each drop's state.

    With ``catalog``, a drop an earlier pass left half done is ready (module docstring).
    ``pepper`` keys the drop ids.
    """
    clock = _Clock(now, quiet_seconds, incomplete_seconds, pepper)
    grouped: dict[tuple[str, str], list[Entry]] = {}
    loose: dict[str, int] = {}
    for entry in drops.list():
        parts = entry.name.split("/")
        if entry.problem and len(parts) < 3:
            parts = [*parts, "_unreadable", "_"][:3]  # a drop or facility folder itself
        if len(parts) == 2:
            loose[parts[0]] = loose.get(parts[0], 0) + 1
            continue
        if len(parts) < 3 or _writing(entry, parts[-1], clock):
            continue  # the drops root's own files (the operator's), or a write under way
        if parts[1] == RECEIPTS:
            continue  # our receipts to the facility, never ingested
        grouped.setdefault((parts[0], parts[1]), []).append(entry)
    found = [
        _drop(drops, facility_id, drop_id, entries, clock)
        for (facility_id, drop_id), entries in sorted(grouped.items(), key=lambda kv: repr(kv[0]))
    ]
    found += [_loose(facility_id, n, clock) for facility_id, n in sorted(loose.items())]
    if catalog is not None:
        _resume_started(catalog, found, pepper)
    return found


# A modification time further ahead than this is not a write in progress (a writer's
# clock is now): it was set by hand or by a skewed clock, and would keep a drop "not quiet"
# until that date. Such a time counts as long ago.
FUTURE_SKEW = 3600.0


@dataclass(frozen=True)
class _Clock:
    now: float
    quiet_seconds: float
    incomplete_seconds: float
    pepper: bytes

    def mtime(self, entry: Entry) -> float:
        return 0.0 if entry.mtime > self.now + FUTURE_SKEW else entry.mtime


def _arrival(mtime: float, others: list[float], now: float) -> float:
    """When a manifest or DICOMDIR arrived, for its incomplete window: its time, or, when
    that is far ahead (set by hand or a skewed clock), the newest plausible time among its
    drop's files, else now. Neither postpones the window for years nor ends it at once."""
    if mtime <= now + FUTURE_SKEW:
        return mtime
    plausible = [t for t in others if t <= now + FUTURE_SKEW]
    return max(plausible, default=now)


def _writing(entry: Entry, name: str, clock: _Clock) -> bool:
    """An atomic write still under way (``.tmp-*``). One left longer than the incomplete
    window is a crashed writer's leftover: it counts as a file of its drop (and is
    quarantined, typically), so nothing stays unaccounted for."""
    return name.startswith(TMP_PREFIX) and clock.now - entry.mtime < clock.incomplete_seconds


def _loose(facility_id: str, count: int, clock: _Clock) -> Drop:
    """Files put straight into a facility folder, outside any drop folder: reported as a
    waiting drop (logged and counted, never ingested, moved or removed) until someone puts
    them into a drop folder."""
    facility_id = catalog_name(facility_id)
    why = f"{count} file(s) outside any drop folder"
    drop_id = drop_id_for(clock.pepper, facility_id, "")
    return Drop(facility_id, drop_id, [], False, "waiting", why, folder=facility_id)


def _short(listed: dict[str, tuple[int, str]], present: dict[str, Entry]) -> tuple[str, ...]:
    """The listed files missing, or present with another size (by name in the drop)."""
    return tuple(
        sorted(
            rel
            for rel, (size, _) in listed.items()
            if rel not in present or present[rel].size != size
        )
    )


def _listed_files(listed: dict[str, tuple[int, str]], present: dict[str, Entry]) -> list[DropFile]:
    """The drop's files, each with the SHA-256 its manifest lists (None when unlisted)."""
    return [
        DropFile(
            item.name,
            item.size,
            item.mtime,
            listed[rel][1] if rel in listed else None,
            is_safe_name(item.name),
            item.tag,
            item.problem,
        )
        for rel, item in present.items()
    ]


def _drop(
    drops: Location, facility_id: str, drop_id: str, entries: list[Entry], clock: _Clock
) -> Drop:
    """One drop and its state, by its manifest, then by its DICOMDIRs."""
    drop = _drop_by_manifest(drops, facility_id, drop_id, entries, clock)
    return with_directories(drops, drop, clock.now, clock.incomplete_seconds)


def _drop_by_manifest(
    drops: Location, facility_id: str, drop_id: str, entries: list[Entry], clock: _Clock
) -> Drop:
    """One drop and its state: without a manifest, ready once quiet; with one, ready once
    every listed file is there whole, incomplete once overdue, else waiting."""
    prefix = f"{facility_id}/{drop_id}/"
    manifest_entry = next((e for e in entries if e.name == prefix + MANIFEST), None)
    if manifest_entry is not None and manifest_entry.problem:
        manifest_entry = None  # a symlink or special file named manifest.json: a bad file
    others = [e for e in entries if e is not manifest_entry]
    folder = prefix[:-1]
    facility_id = catalog_name(facility_id)
    drop_id = drop_id_for(clock.pepper, facility_id, drop_id)
    first_seen = min((e.mtime for e in entries), default=clock.now)
    if manifest_entry is None:
        newest = max((clock.mtime(e) for e in entries), default=0.0)
        quiet = clock.now - newest >= clock.quiet_seconds
        state: DropState = "ready" if quiet else "waiting"
        files = [file_from_entry(e) for e in others]
        why = "" if quiet else "not quiet yet"
        return Drop(
            facility_id, drop_id, files, False, state, why, folder=folder, first_seen=first_seen
        )
    arrived = _arrival(manifest_entry.mtime, [e.mtime for e in entries], clock.now)
    overdue = clock.now - arrived >= clock.incomplete_seconds
    incomplete_at = arrived + clock.incomplete_seconds
    try:
        if manifest_entry.size > MAX_MANIFEST_BYTES:
            raise ValueError("manifest too large")  # read whole, it could exhaust memory
        raw = drops.read_bytes(manifest_entry.name, unchecked=True, limit=MAX_MANIFEST_BYTES + 1)
        listed, owners = _parse_manifest(raw)
    except (ValueError, UnicodeDecodeError, OSError, RecursionError) as exc:
        if isinstance(exc, OSError) and not is_file_problem(exc):
            raise  # the store's trouble (a 503): the scan retries, the drop is not judged
        files = [file_from_entry(e) for e in others]
        state = "incomplete" if overdue else "waiting"
        why = f"manifest is malformed ({type(exc).__name__})"
        return Drop(
            facility_id,
            drop_id,
            files,
            True,
            state,
            why,
            {},
            manifest_entry.name,
            folder=folder,
            first_seen=first_seen,
            incomplete_at=incomplete_at,
        )
    present = {e.name[len(prefix) :]: e for e in others}
    short = _short(listed, present)
    missing = len(short)
    absent = {prefix + rel: sha for rel, (_, sha) in listed.items() if rel not in present}
    files = _listed_files(listed, present)
    unlisted_busy = any(
        rel not in listed and clock.now - clock.mtime(e) < clock.quiet_seconds
        for rel, e in present.items()
    )
    if missing == 0 and not unlisted_busy:
        state, why = "ready", ""
    else:
        state = "incomplete" if overdue else "waiting"
        why = f"{missing} listed file(s) missing or short" if missing else "unlisted files busy"
    resumable = absent if missing == len(absent) and not unlisted_busy else {}
    return Drop(
        facility_id,
        drop_id,
        files,
        True,
        state,
        why,
        owners,
        manifest_entry.name,
        resumable,
        folder,
        short,
        first_seen,
        incomplete_at,
    )


def _read_directories(drops: Location, drop: Drop) -> dict[DropFile, Directory]:
    """The drop's readable DICOMDIRs (one that cannot be read is an ordinary file)."""
    found: dict[DropFile, Directory] = {}
    for f in drop.files:
        if not is_dicomdir_name(f.name) or not f.safe or f.problem or f.size > DICOMDIR_MAX:
            continue
        if len(found) >= MAX_DIRECTORIES:
            break  # more are ordinary files (and quarantined): each read costs every scan
        try:
            raw = drops.read_bytes(f.name, unchecked=True, limit=DICOMDIR_MAX + 1)
            directory = read_dicomdir(raw) if len(raw) <= DICOMDIR_MAX else None
        except OSError as exc:
            if not is_file_problem(exc):
                raise
            continue
        if directory is not None:
            found[f] = directory
    return found


def with_directories(
    drops: Location, drop: Drop, now: float, incomplete_seconds: float, wait: bool = True
) -> Drop:
    """``drop`` read by its DICOMDIRs (a CD's table of contents), which become its
    ``directories``: each referenced file gets the SOP Instance UID its record names, the
    files in a DICOMDIR's folder that none references are ``extra`` (a CD's viewer,
    ``autorun.inf``, README; an image among them is still ingested), and with
    ``wait`` a ready drop waits until every referenced file is there, going incomplete
    ``incomplete_seconds`` after the DICOMDIR arrived, as with a manifest. References are
    matched without regard to case (ISO 9660 names are upper case; copies may not be)."""
    if wait and drop.state == "waiting" and not drop.has_manifest:
        return drop  # not quiet yet: it waits anyway, and its DICOMDIR may still be copying
    read = _read_directories(drops, drop)
    if not read:
        return drop
    by_upper = {f.name.upper(): f for f in drop.files}
    expected: dict[str, str] = {}
    absent: dict[str, str] = {}
    for f, directory in read.items():
        base = f.name[: -len(DICOMDIR_NAME)]  # its folder, with the trailing "/"
        for path, uid in directory.references.items():
            hit = by_upper.get(base.upper() + path)
            if hit is None:
                absent[base[len(drop.folder) + 1 :] + path] = uid
            else:
                expected[hit.name] = uid
    bases = tuple(f.name[: -len(DICOMDIR_NAME)] for f in read)
    files = [
        replace(f, expected_uid=expected.get(f.name) or None, extra=f.name not in expected)
        if f.name.startswith(bases)
        else f
        for f in drop.files
        if f not in read
    ]
    drop = replace(
        drop,
        files=files,
        directories=drop.directories + tuple(f.name for f in read),
        references=drop.references + sum(len(d.references) for d in read.values()),
    )
    if not absent:
        return drop
    arrived = _arrival(max(f.mtime for f in read), [f.mtime for f in drop.files], now)
    drop.missing = tuple(sorted({*drop.missing, *absent}))
    if not wait or drop.state != "ready":
        return drop
    overdue = now - arrived >= incomplete_seconds
    drop.state = "incomplete" if overdue else "waiting"
    drop.why = f"{len(absent)} file(s) the DICOMDIR references missing"
    drop.incomplete_at = arrived + incomplete_seconds
    drop.absent_uids = absent
    return drop


def _resume_started(catalog: Catalog, drops: list[Drop], pepper: bytes) -> None:
    """Mark ready the drops whose only missing files the catalog accounts for."""
    stalled = [d for d in drops if d.state != "ready" and (d.absent or d.absent_uids)]
    if not stalled:
        return
    uids = {u for d in stalled for u in d.absent_uids.values() if u}
    keyed = {study_key(pepper, u) for u in uids}  # a referenced file quarantined since
    known, hashes, found_uids = catalog.read_only().many(
        [
            (
                "SELECT facility_id || '/' || drop_id AS k FROM drops"
                " WHERE facility_id || '/' || drop_id IN (SELECT unnest(?::VARCHAR[]))",
                [[d.key for d in stalled]],
            ),
            (
                "SELECT sha256 FROM instances WHERE sha256 IN (SELECT unnest(?::VARCHAR[]))"
                " UNION SELECT sha256 FROM quarantine"
                " WHERE sha256 IN (SELECT unnest(?::VARCHAR[]))",
                [sorted({s for d in stalled for s in d.absent.values()})] * 2,
            ),
            (
                "SELECT sop_instance_uid AS k FROM instances"
                " WHERE sop_instance_uid IN (SELECT unnest(?::VARCHAR[]))"
                " UNION SELECT uid_key FROM quarantine_uids"
                " WHERE uid_key IN (SELECT unnest(?::VARCHAR[]))",
                [sorted(uids), sorted(keyed)],
            ),
        ]
    )
    seen_drops, seen_hashes = set(known["k"]), set(hashes["sha256"])
    seen_uids = set(found_uids["k"])
    for drop in stalled:
        accounted = set(drop.absent.values()) <= seen_hashes and all(
            u and (u in seen_uids or study_key(pepper, u) in seen_uids)
            for u in drop.absent_uids.values()
        )
        # A known drop folder resumes by its manifest; a CD only by its own images (the
        # same folder name reused for a later CD must still wait for every image).
        if (drop.key in seen_drops and not drop.absent_uids) or accounted:
            drop.state, drop.why = "ready", ""


scan_drops_task = task(
    name="scan-drops",
    retries=3,
    retry_condition_fn=retry_transient,
    retry_delay_seconds=[1, 2, 5],
    cache_policy=NO_CACHE,
)(scan_drops)
