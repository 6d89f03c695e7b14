"""Archives in a drop: ZIP and tar files unpacked into the drop, member by member.

Facilities send PACS exports as ``.zip`` and scripts' output as ``.tar``, ``.tar.gz`` or
``.tgz``. Before a ready drop's files are batched, each archive in it is read as a stream
and its members are written beside it, under ``<archive name>.contents/<member path>``
in the drop itself (the drop zone already holds these bytes in plain text; nothing is
written anywhere else). Each member is then a file of the drop like any other, with its
own outcome: ingested, duplicate, or quarantined with a reason.

Rules (the limits are settings, see ``ArchiveLimits``):

* a member whose name escapes the archive (``..``, absolute, a drive letter, NUL, a
  backslash) is not written: it is reported as ``unsafe_name`` (zip-slip). Symbolic links,
  hard links, devices and FIFOs in a tar are not written either:
  ``archive_member_refused``. Neither keeps bytes (a refused member has none of its own);
* an archive past a limit is quarantined whole, nothing of it unpacked:
  ``archive_too_large`` (total uncompressed bytes, member count, or compression ratio, which
  stops a zip bomb), ``archive_encrypted``, ``archive_corrupt`` (truncated, bad CRC, not
  the format its name says). What was written before the problem showed is deleted;
* an archive inside an archive is unpacked too, down to ``max_depth`` levels of nesting;
  one deeper is quarantined whole as ``archive_too_deep``;
* memory is bounded whatever a member's size: members are copied in 1 MiB chunks, and a
  tar is read strictly in order (``r|*``), so a tarball on S3 is one sequential read;
* a manifest may list an archive: its own SHA-256 is checked before it is opened (a
  mismatch quarantines it whole, unopened).

Exactly once: the archive is removed only when the drop is finished, that is when every
member has been cataloged, counted a duplicate or quarantined and its file removed
(:func:`dropvault.tasks.ingest.finish_drops`). A run stopped anywhere leaves the archive
in place; the next run unpacks it again to the same names, and members cataloged before
the stop come out as duplicates (their instance UID and SHA-256 are known) while
quarantined ones keep their deterministic quarantine ids. A member's identity is thus the
archive's place in the drop plus the member's path, and its content's SHA-256.

A CD sent as an archive is read by its DICOMDIR once unpacked (see
:func:`dropvault.tasks.drops.with_directories`).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import IO

from prefect import task
from prefect.cache_policies import NO_CACHE

from dropvault.storage.errors import retry_transient
from dropvault.storage.locations import (
    Location,
    UnsafeNameError,
    is_file_problem,
    safe_relpath,
)
from dropvault.tasks.drops import Drop, DropFile, file_from_entry, with_directories
from dropvault.tasks.reasons import QuarantineReason

log = logging.getLogger(__name__)

CONTENTS = ".contents"  # <archive name>.contents/: where its members are unpacked
CHUNK = 1 << 20
SMALL_TOTAL = 1 << 20  # below this many bytes unpacked, no ratio is a bomb
_KINDS = ((".tar.gz", "tar"), (".tgz", "tar"), (".tar", "tar"), (".zip", "zip"))
# Fault-injection points for crash tests: name -> callable run at that point.
FAULTS: dict[str, Callable[[], None]] = {}


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds on one archive (settings ``DROPVAULT_ARCHIVE_*``)."""

    max_bytes: int = 16 << 30  # total uncompressed bytes of its members
    max_members: int = 100_000
    max_ratio: float = 200.0  # uncompressed bytes per byte of archive
    max_depth: int = 1  # archives inside archives unpacked; one level deeper is refused


class ArchiveRefused(Exception):
    """The archive is quarantined whole: ``reason`` and a PHI-free ``detail``."""

    def __init__(self, reason: QuarantineReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def archive_kind(name: str) -> str | None:
    """``"zip"``, ``"tar"`` or None, by the name's ending (any case)."""
    lower = name.lower()
    return next((kind for suffix, kind in _KINDS if lower.endswith(suffix)), None)


def depth_of(name: str) -> int:
    """How many archives ``name`` was unpacked from (``.contents/`` folders in its path)."""
    return sum(1 for part in name.split("/")[:-1] if part.endswith(CONTENTS))


@dataclass
class _Unpacking:
    """One archive being unpacked: what was written, what was refused, the running totals."""

    drops: Location
    archive: DropFile
    limits: ArchiveLimits
    written: list[str] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    refused: list[DropFile] = field(default_factory=list)
    total: int = 0
    members: int = 0

    @property
    def prefix(self) -> str:
        return self.archive.name + CONTENTS + "/"

    def count(self, size: int) -> None:
        """Add a member of ``size`` bytes (as it unpacks, or as declared up front)."""
        self.members += 1
        if self.members > self.limits.max_members:
            raise ArchiveRefused(
                QuarantineReason.ARCHIVE_TOO_LARGE,
                f"more than {self.limits.max_members} members",
            )
        self.grow(size)

    def grow(self, size: int) -> None:
        self.total += size
        limits = self.limits
        # The ratio first: a bomb is named as one even when it is also over the total.
        if self.total > SMALL_TOTAL and self.total > limits.max_ratio * max(self.archive.size, 1):
            raise ArchiveRefused(
                QuarantineReason.ARCHIVE_TOO_LARGE,
                f"compression ratio over {limits.max_ratio:g}",
            )
        if self.total > limits.max_bytes:
            raise ArchiveRefused(
                QuarantineReason.ARCHIVE_TOO_LARGE,
                f"over {limits.max_bytes} bytes unpacked",
            )

    def refuse(self, index: int, reason: QuarantineReason, detail: str) -> None:
        """A member that is not written: reported (no bytes) under a stand-in name."""
        self.refused.append(
            DropFile(
                f"{self.prefix}.refused-{index}",
                0,
                self.archive.mtime,
                problem=detail,
                verdict=reason,
            )
        )

    def target(self, index: int, name: str) -> str | None:
        """The member's name in the drop, or None (refused) when it escapes the archive or
        repeats an earlier member's (which it would overwrite)."""
        while name.startswith("./"):
            name = name[2:]  # ``tar -C dir .`` writes every name as ./name
        try:
            rel = self.prefix + safe_relpath(name)
        except UnsafeNameError:
            self.refuse(index, QuarantineReason.UNSAFE_NAME, "member name escapes its archive")
            return None
        if rel in self.seen:
            self.refuse(index, QuarantineReason.UNSAFE_NAME, "member name repeats another's")
            return None
        return rel

    def write(self, name: str, src: IO[bytes]) -> None:
        self.written.append(name)
        self.seen.add(name)
        with self.drops.writer(name) as out:
            while chunk := src.read(CHUNK):
                self.grow(len(chunk))
                out.write(chunk)
        if hook := FAULTS.get("after_member"):
            hook()

    # -- formats ---------------------------------------------------------------

    def unpack_zip(self, fh: IO[bytes]) -> None:
        with zipfile.ZipFile(fh) as zf:
            infos = zf.infolist()
            if any(i.flag_bits & 0x1 for i in infos):
                raise ArchiveRefused(QuarantineReason.ARCHIVE_ENCRYPTED, "ZIP is encrypted")
            declared = _Unpacking(self.drops, self.archive, self.limits)
            for info in infos:
                declared.count(info.file_size)  # refused before a byte is written
            for index, info in enumerate(infos):
                if info.is_dir():
                    continue
                self.members += 1
                name = self.target(index, info.filename)
                if name is not None:
                    with zf.open(info) as src:
                        self.write(name, src)

    def unpack_tar(self, fh: IO[bytes]) -> None:
        with tarfile.open(fileobj=fh, mode="r|*") as tf:
            for index, member in enumerate(tf):
                if member.isdir():
                    continue
                if not member.isreg():
                    self.count(0)
                    kind = "link" if member.issym() or member.islnk() else "special file"
                    self.refuse(
                        index,
                        QuarantineReason.ARCHIVE_MEMBER_REFUSED,
                        f"archive member is a {kind}",
                    )
                    continue
                self.count(0)
                name = self.target(index, member.name)
                src = tf.extractfile(member)
                if name is not None and src is not None:
                    self.write(name, src)

    def undo(self) -> None:
        """Delete what this archive left unpacked (its members so far, and any an earlier
        stopped run wrote): a refused archive keeps nothing in plain text beside it."""
        names = set(self.written)
        with contextlib.suppress(FileNotFoundError):
            names.update(e.name for e in self.drops.list(self.prefix.rstrip("/")))
        for name in sorted(names):
            with contextlib.suppress(FileNotFoundError):
                self.drops.delete(name)
        with contextlib.suppress(OSError):
            self.drops.rmdir_empty(self.prefix.rstrip("/"))


_CORRUPT = (
    zipfile.BadZipFile,
    tarfile.TarError,
    EOFError,
    zlib.error,
    gzip.BadGzipFile,  # an OSError: caught before the store's own errors
    NotImplementedError,  # a ZIP compression method Python does not have
)


def _hash(drops: Location, name: str) -> str:
    digest = hashlib.sha256()
    with drops.open(name) as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def unpack_archive(drops: Location, archive: DropFile, limits: ArchiveLimits) -> list[DropFile]:
    """Unpack one archive into the drop; returns its members as files of the drop (written
    ones as listed now, refused ones with their reason). Raises :class:`ArchiveRefused`
    when it is to be quarantined whole (having deleted anything it wrote)."""
    if archive.expected_sha256 and _hash(drops, archive.name) != archive.expected_sha256:
        raise ArchiveRefused(
            QuarantineReason.CHECKSUM_MISMATCH, "SHA-256 differs from the manifest"
        )
    job = _Unpacking(drops, archive, limits)
    try:
        with drops.open(archive.name) as fh:
            if archive_kind(archive.name) == "zip":
                job.unpack_zip(fh)
            else:
                job.unpack_tar(fh)
    except ArchiveRefused:
        job.undo()
        raise
    except _CORRUPT as exc:
        job.undo()
        raise ArchiveRefused(
            QuarantineReason.ARCHIVE_CORRUPT, f"archive cannot be read ({type(exc).__name__})"
        ) from None
    except OSError as exc:
        job.undo()
        if not is_file_problem(exc):
            raise  # the store's trouble: the task retries
        raise ArchiveRefused(
            QuarantineReason.ARCHIVE_CORRUPT, f"archive cannot be read ({type(exc).__name__})"
        ) from None
    written = set(job.written)
    listed = [e for e in drops.list(job.prefix.rstrip("/")) if e.name in written] if written else []
    return [file_from_entry(e) for e in listed] + job.refused


def _unpack_all(
    drops: Location, archive: DropFile, limits: ArchiveLimits, unpacked: list[str]
) -> Iterator[DropFile]:
    """The files ``archive`` turns into: its members, nested archives unpacked in turn
    (down to ``limits.max_depth``), or the archive itself marked to be quarantined."""
    depth = depth_of(archive.name)
    if depth > limits.max_depth:
        yield replace(
            archive,
            verdict=QuarantineReason.ARCHIVE_TOO_DEEP,
            verdict_detail=f"archive nested more than {limits.max_depth} deep",
        )
        return
    try:
        members = unpack_archive(drops, archive, limits)
    except ArchiveRefused as refused:
        yield replace(archive, verdict=refused.reason, verdict_detail=refused.detail)
        return
    unpacked.append(archive.name)
    for member in members:
        if archive_kind(member.name) and not member.problem:
            yield from _unpack_all(drops, member, limits, unpacked)
        else:
            yield member


def unpack_drop(drops: Location, drop: Drop, limits: ArchiveLimits) -> Drop:
    """``drop`` with each archive replaced by its members (see the module docstring). Only a
    ready drop is unpacked: an incomplete one's archives are quarantined whole with it."""
    if drop.state != "ready":
        return drop
    candidates = [f for f in drop.files if archive_kind(f.name) and f.safe and not f.problem]
    # One unpacked from another archive still here is written again by that one's unpacking.
    outer = tuple(a.name + CONTENTS + "/" for a in candidates)
    archives = [a for a in candidates if not _inside(a.name, outer, a.name + CONTENTS + "/")]
    if not archives:
        return drop
    prefixes = tuple(a.name + CONTENTS + "/" for a in archives)
    names = {a.name for a in archives}
    files = [f for f in drop.files if f.name not in names and not f.name.startswith(prefixes)]
    unpacked: list[str] = []
    for archive in archives:
        try:
            files.extend(_unpack_all(drops, archive, limits, unpacked))
        except OSError as exc:
            if not is_file_problem(exc):
                raise
            files.append(replace(archive, problem="archive cannot be read now"))
    # A CD sent as an archive: its DICOMDIR sorts the members (the archive is whole, so a
    # file it references and lacks is only reported missing, not waited for).
    drop = replace(drop, files=files, unpacked=tuple(unpacked))
    return with_directories(drops, drop, 0.0, 1.0, wait=False)


def _inside(name: str, prefixes: tuple[str, ...], own: str) -> bool:
    return any(name.startswith(p) for p in prefixes if p != own)


def unpack_drops(drops: Location, ready: list[Drop], limits: ArchiveLimits) -> list[Drop]:
    """Every ready drop with its archives unpacked; a drop's failure is its own (logged by
    keyed id: the archive's name can be PHI), leaving it for the next run."""
    out = []
    for drop in ready:
        try:
            out.append(unpack_drop(drops, drop, limits))
        except Exception as exc:
            if isinstance(exc, OSError) and not is_file_problem(exc):
                raise  # the store's trouble: the task retries
            log.warning(
                "drop %s/%s: unpacking failed (%s); left for the next run",
                drop.facility_id,
                drop.drop_id,
                type(exc).__name__,
            )
    return out


unpack_drops_task = task(
    name="unpack-archives",
    retries=2,
    retry_condition_fn=retry_transient,
    retry_delay_seconds=[1, 5],
    cache_policy=NO_CACHE,
)(unpack_drops)
