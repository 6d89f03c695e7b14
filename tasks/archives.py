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
import errno
import gzip
import hashlib
import logging
import re
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import IO, Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from dropvault.storage.errors import retry_transient
from dropvault.storage.locations import (
    Entry,
    Location,
    UnsafeNameError,
    is_file_problem,
    read_problem,
    safe_relpath,
)
from dropvault.tasks.drops import TMP_PREFIX, Drop, DropFile, file_from_entry, with_directories
from dropvault.tasks.reasons import QuarantineReason

log = logging.getLogger(__name__)

CONTENTS = ".contents"  # <archive name>.contents/: where its members are unpacked
CHUNK = 1 << 20
SMALL_TOTAL = 1 << 20  # below this many bytes unpacked, no ratio is a bomb
MAX_HEADER = 1 << 20  # a tar's long-name or pax header larger than this is corrupt
MAX_SEGMENT = 255  # bytes in one part of a member's name (the usual filesystem limit)
MAX_NAME = 1024  # bytes in a member's whole name
# Bytes of central directory counted as one entry when bounding a ZIP before zipfile reads
# it (46 fixed bytes and a name; ~10x that in memory once parsed).
CD_ENTRY_BYTES = 300
# By name: a ``.tar`` is read as plain tar and a ``.tgz`` as gzip only (tarfile would
# otherwise detect bzip2 and xz, which decompress without a bound on memory).
_KINDS = ((".tar.gz", "tgz"), (".tgz", "tgz"), (".tar", "tar"), (".zip", "zip"))
# ZIP members: only stored and deflated (what PACS exports write). zipfile's bzip2 and
# LZMA readers decompress a whole block before the declared size cuts them off.
_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED}
_LONG_HEADERS = {tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                 tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE}  # fmt: skip
# Vendor typeflags that carry tar's bookkeeping, not a file: Solaris ACLs (A) and extended
# headers (X), GNU dump directories (D), volume labels (V), old long names (N), inode
# metadata (I). Read as regular files (POSIX's rule for unknown types), an ACL entry would
# take the name of the image after it.
_VENDOR_METADATA = {b"A", b"D", b"V", b"N", b"X", b"I"}
# Fault-injection points for crash tests: name -> callable run at that point.
FAULTS: dict[str, Callable[[], None]] = {}


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds on one archive, nested archives included (settings ``DROPVAULT_ARCHIVE_*``)."""

    max_bytes: int = 16 << 30  # total uncompressed bytes of its members
    max_members: int = 100_000
    max_ratio: float = 200.0  # uncompressed bytes per byte of archive
    max_depth: int = 1  # archives inside archives unpacked; one level deeper is refused
    max_file_bytes: int = 4 << 30  # a member larger than a drop file may be refuses it all


class ArchiveRefused(Exception):
    """The archive is quarantined whole: ``reason`` and a PHI-free ``detail``."""

    def __init__(self, reason: QuarantineReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class UnpackFailed(Exception):
    """The drop's storage refused a write (full, read-only): the drop waits for the next
    run, with nothing of this archive left unpacked; other drops go on."""


def archive_kind(name: str) -> str | None:
    """``"zip"``, ``"tar"``, ``"tgz"`` or None, by the name's ending (any case)."""
    lower = name.lower()
    return next((kind for suffix, kind in _KINDS if lower.endswith(suffix)), None)


def depth_of(name: str) -> int:
    """How many archives ``name`` was unpacked from (``.contents/`` folders in its path)."""
    return sum(1 for part in name.split("/")[:-1] if part.endswith(CONTENTS))


@dataclass
class _Budget:
    """The running totals of one archive dropped, shared with the archives inside it: the
    bounds hold for what one dropped file unpacks to, however it is nested."""

    limits: ArchiveLimits
    archive_size: int
    total: int = 0
    members: int = 0
    written: list[str] = field(default_factory=list)  # by every archive in it

    def count(self) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise ArchiveRefused(
                QuarantineReason.ARCHIVE_TOO_LARGE, f"more than {self.limits.max_members} members"
            )

    def grow(self, size: int) -> None:
        self.total += size
        limits = self.limits
        # The ratio first: a bomb is named as one even when it is also over the total.
        if self.total > SMALL_TOTAL and self.total > limits.max_ratio * max(self.archive_size, 1):
            raise ArchiveRefused(
                QuarantineReason.ARCHIVE_TOO_LARGE, f"compression ratio over {limits.max_ratio:g}"
            )
        if self.total > limits.max_bytes:
            raise ArchiveRefused(
                QuarantineReason.ARCHIVE_TOO_LARGE, f"over {limits.max_bytes} bytes unpacked"
            )

    def check_member(self, size: int) -> None:
        if size > self.limits.max_file_bytes:
            raise ArchiveRefused(
                QuarantineReason.ARCHIVE_TOO_LARGE,
                f"a member is over the {self.limits.max_file_bytes}-byte file limit",
            )


_PAX_LENGTH = re.compile(rb"([0-9]{1,20}) ")


def _pax_records_whole(buf: bytes) -> bool:
    """Whether ``buf`` (a pax header's block) is records each ``"<length> <key>=<value>\\n"``
    of their stated length, then NUL padding: checked in one linear pass."""
    pos, size = 0, len(buf)
    while pos < size and buf[pos] != 0:
        match = _PAX_LENGTH.match(buf, pos)
        if match is None:
            return False
        end = pos + int(match.group(1))
        if end < match.end() + 2 or end > size or buf[end - 1 : end] != b"\n":
            return False
        if buf.find(b"=", match.end(), end) < 0:
            return False
        pos = end
    return True


class _Replay:
    """A stream whose first read returns bytes already taken from it."""

    def __init__(self, first: bytes, stream: Any) -> None:
        self._first: bytes | None = first
        self._stream = stream

    def read(self, size: int | None = None) -> bytes:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return self._stream.read(size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses a long-name or pax header before tarfile reads it whole into memory, and old
    GNU sparse members (their chain of extension blocks has no bound)."""

    def _proc_pax(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        """A pax header whose records are not each ``"<length> <key>=<value>\\n"`` is
        refused before tarfile's parser sees it: Python 3.11.7's parser is quadratic on
        some (CVE-2024-6232; a 64,000-digit header cost 6 s; 20,000 short records before
        one far ``=`` cost 1.5 s per 80 KB), and each member may have a header."""
        stream = tarfile_.fileobj
        buf = stream.read(self._block(self.size))  # type: ignore[attr-defined]
        if not _pax_records_whole(buf):
            raise tarfile.HeaderError("pax header records are malformed")
        tarfile_.fileobj = _Replay(buf, stream)
        try:
            return super()._proc_pax(tarfile_)  # type: ignore[misc]
        finally:
            tarfile_.fileobj = stream

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _LONG_HEADERS and self.size > MAX_HEADER:
            raise tarfile.HeaderError("oversized extended header")
        if self.type == tarfile.GNUTYPE_SPARSE:  # old GNU sparse: unbounded extension blocks
            raise tarfile.HeaderError("sparse members are not accepted")
        return super()._proc_member(tarfile_)  # type: ignore[misc]


@dataclass
class _Unpacking:
    """One archive being unpacked: what was written, what was refused."""

    drops: Location
    archive: DropFile
    budget: _Budget
    written: list[str] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    refused: list[DropFile] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return self.archive.name + CONTENTS + "/"

    def refuse(self, index: int, reason: QuarantineReason, detail: str) -> None:
        """A member that is not written: reported (no bytes) under a stand-in name that no
        member's name can take (members are all under ``<archive>.contents/``)."""
        self.refused.append(
            DropFile(
                f"{self.archive.name}#refused-member-{index}",
                0,
                self.archive.mtime,
                problem=detail,
                verdict=reason,
            )
        )

    def target(self, index: int, name: str) -> str | None:
        """The member's name in the drop, or None (refused) when it escapes the archive,
        reaches into an unpacking folder, is too long, or repeats an earlier member's."""
        while name.startswith("./"):
            name = name[2:]  # ``tar -C dir .`` writes every name as ./name
        try:
            rel = safe_relpath(name)
        except UnsafeNameError:
            self.refuse(index, QuarantineReason.UNSAFE_NAME, "member name escapes its archive")
            return None
        parts = rel.split("/")
        if any(p.endswith(CONTENTS) for p in parts[:-1]) or parts[-1].endswith(CONTENTS):
            # Where a nested archive unpacks: a member there would be overwritten or removed.
            self.refuse(index, QuarantineReason.UNSAFE_NAME, "member name is reserved")
            return None
        if len(rel.encode()) > MAX_NAME or any(len(p.encode()) > MAX_SEGMENT for p in parts):
            self.refuse(index, QuarantineReason.UNSAFE_NAME, "member name is too long")
            return None
        full = self.prefix + rel
        if full in self.seen:
            self.refuse(index, QuarantineReason.UNSAFE_NAME, "member name repeats another's")
            return None
        return full

    def write(self, name: str, src: IO[bytes]) -> None:
        self.written.append(name)
        self.budget.written.append(name)
        self.seen.add(name)
        try:
            with self.drops.writer(name) as out:
                while chunk := src.read(CHUNK):
                    self.budget.grow(len(chunk))
                    out.write(chunk)
        except OSError as exc:
            if exc.errno is None or self.drops.is_object_store:
                raise  # the archive's own trouble (a bad stream), or the store's
            # The local disk refused the write (full, read-only, a folder in the way).
            if exc.errno in (errno.ENOTDIR, errno.EISDIR, errno.EEXIST):
                raise ArchiveRefused(
                    QuarantineReason.ARCHIVE_CORRUPT, "a member is both a file and a folder"
                ) from None
            raise UnpackFailed(
                f"the drops location refused a write ({errno.errorcode.get(exc.errno, exc.errno)})"
            ) from None
        if hook := FAULTS.get("after_member"):
            hook()

    # -- formats ---------------------------------------------------------------

    def unpack_zip(self, fh: IO[bytes]) -> None:
        declared = _zip_entries(fh)
        if declared is not None and declared > self.budget.limits.max_members:
            raise ArchiveRefused(
                QuarantineReason.ARCHIVE_TOO_LARGE,
                f"more than {self.budget.limits.max_members} members",
            )
        if _zip_extra_too_long(fh):
            raise ArchiveRefused(
                QuarantineReason.ARCHIVE_CORRUPT, "a ZIP entry's extra field is too long"
            )
        with zipfile.ZipFile(fh) as zf:
            infos = zf.infolist()
            # Bit 0: encrypted; bit 6: "strong" encryption; bit 5: patched data zipfile
            # cannot read. Refused on the flags, before zipfile would raise on a member.
            if any(i.flag_bits & (0x1 | 0x40) for i in infos):
                raise ArchiveRefused(QuarantineReason.ARCHIVE_ENCRYPTED, "ZIP is encrypted")
            if any(i.flag_bits & 0x20 for i in infos):
                raise ArchiveRefused(QuarantineReason.ARCHIVE_CORRUPT, "ZIP of patched data")
            if any(i.compress_type not in _ZIP_METHODS for i in infos):
                raise ArchiveRefused(
                    QuarantineReason.ARCHIVE_CORRUPT, "a member uses a compression not accepted"
                )
            # Refused on what the directory declares, before a byte is written.
            declared_budget = replace(self.budget)
            for info in infos:
                declared_budget.count()
                declared_budget.check_member(info.file_size)
                declared_budget.grow(info.file_size)
            for index, info in enumerate(infos):
                self.budget.count()
                if info.is_dir():
                    continue
                name = self.target(index, info.filename)
                if name is not None:
                    with zf.open(info) as src:
                        self.write(name, src)

    def unpack_tar(self, fh: IO[bytes], gz: bool) -> None:
        if gz and not _gzip_header_short(fh):
            raise ArchiveRefused(QuarantineReason.ARCHIVE_CORRUPT, "gzip header is too long")
        with tarfile.open(fileobj=fh, mode="r|gz" if gz else "r|", tarinfo=_BoundedTarInfo) as tf:
            for index, member in enumerate(tf):
                tf.members.clear()  # type: ignore[attr-defined]  # stream mode keeps each header
                self.budget.count()
                if member.isdir():
                    continue  # tar's own bookkeeping: no file of the facility's
                if member.type in _VENDOR_METADATA:
                    # Not a file, but tarfile inflates its data to skip it: that counts.
                    self.budget.check_member(member.size)
                    self.budget.grow(member.size)
                    continue
                if member.type == b"M":
                    raise ArchiveRefused(
                        QuarantineReason.ARCHIVE_CORRUPT, "a multi-volume tar continuation"
                    )
                # POSIX: a type tar does not know is read as a regular file (tarfile does).
                if not member.isreg() and member.type in tarfile.SUPPORTED_TYPES:
                    kind = "link" if member.issym() or member.islnk() else "special file"
                    self.refuse(
                        index,
                        QuarantineReason.ARCHIVE_MEMBER_REFUSED,
                        f"archive member is a {kind}",
                    )
                    continue
                self.budget.check_member(member.size)
                name = self.target(index, member.name)
                src = tf.extractfile(member)
                if name is not None and src is not None:
                    self.write(name, src)
                else:
                    self.budget.grow(member.size)  # skipped, yet inflated all the same

    def clear_leftovers(self) -> None:
        """Partial files a killed run's writer left in this archive's folder (``.tmp-*``):
        plain text nothing else would remove."""
        for entry in self._listed():
            if entry.name.rsplit("/", 1)[-1].startswith(TMP_PREFIX):
                with contextlib.suppress(OSError):
                    self.drops.delete(entry.name, unchecked=True)

    def _listed(self) -> list[Entry]:
        try:
            return self.drops.list(self.prefix.rstrip("/"))
        except (FileNotFoundError, UnsafeNameError):
            return []

    def undo(self) -> None:
        """Delete what this unpacking wrote (an earlier stopped run wrote the same names in
        the same order, so those go too): a refused archive keeps nothing in plain text
        beside it. Files the facility put in the folder itself are theirs: they stay."""
        for name in sorted(set(self.written)):
            with contextlib.suppress(OSError):
                self.drops.delete(name, unchecked=True)
        with contextlib.suppress(OSError):
            self.drops.rmdir_empty(self.prefix.rstrip("/"))


def _zip_entries(fh: IO[bytes]) -> int | None:
    """The entry count a ZIP's end record declares, read before zipfile loads every entry
    (a million-entry directory would cost its memory first); None if it cannot be read."""
    end_record = getattr(zipfile, "_EndRecData", None)
    if end_record is None:
        return None
    try:
        record = end_record(fh)
        fh.seek(0)
    except (OSError, ValueError, struct.error):
        return None
    if not record:
        return None
    # zipfile reads the directory by its size, whatever count the record declares: a
    # directory larger than the member limit's worth of entries counts as that many more.
    by_size = int(record[5]) // CD_ENTRY_BYTES  # _ECD_SIZE
    return max(int(record[4]), by_size)  # _ECD_ENTRIES_TOTAL


# A ZIP entry's extra field holds a few records (times, Zip64 sizes, a Unicode name of up
# to MAX_NAME bytes). Python 3.11.7's zipfile re-slices the field for every record: 450
# fields of 65,532 bytes of empty records cost 8.6 s to open a 59 MB ZIP.
MAX_ZIP_EXTRA = 2048
_CD_HEADER = struct.Struct("<4s4B4HL2L5H2L")  # zipfile's central directory entry
_CD_MAGIC = b"PK\x01\x02"


def _zip_extra_too_long(fh: IO[bytes]) -> bool:
    """Whether any central directory entry has an extra field over :data:`MAX_ZIP_EXTRA`,
    found where zipfile will look for the directory, before it parses one. False when the
    directory cannot be found (zipfile then reports the ZIP corrupt)."""
    end_record = getattr(zipfile, "_EndRecData", None)
    if end_record is None:
        return False
    try:
        record = end_record(fh)
        if not record:
            return False
        # zipfile's own arithmetic: the directory ends where the end record is found.
        size = int(record[5])  # _ECD_SIZE
        start = int(record[9]) - size  # _ECD_LOCATION
        if record[0] == zipfile.stringEndArchive64:  # type: ignore[attr-defined]
            start -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator  # type: ignore[attr-defined]
        fh.seek(start)
        directory = fh.read(size)
    except (OSError, ValueError, struct.error):
        return False
    finally:
        fh.seek(0)
    pos = 0
    while pos + _CD_HEADER.size <= len(directory):
        fields = _CD_HEADER.unpack_from(directory, pos)
        if fields[0] != _CD_MAGIC:
            return False
        name_len, extra_len, comment_len = fields[12], fields[13], fields[14]
        if extra_len > MAX_ZIP_EXTRA:
            return True
        pos += _CD_HEADER.size + name_len + extra_len + comment_len
    return False


# tarfile reads a gzip header's file name and comment a byte a call (a 64 MiB name with no
# NUL cost 29 s): a header longer than this is refused before tarfile sees it.
MAX_GZIP_HEADER = 4096
_FEXTRA, _FNAME, _FCOMMENT = 4, 8, 16


def _gzip_header_short(fh: IO[bytes]) -> bool:
    """Whether the gzip header at the start of ``fh`` (RFC 1952) ends within
    :data:`MAX_GZIP_HEADER` bytes. A header that is not gzip's passes: tarfile refuses it."""
    try:
        head = fh.read(MAX_GZIP_HEADER)
    finally:
        fh.seek(0)
    if len(head) < 10 or head[:2] != b"\x1f\x8b":
        return True
    flags, pos = head[3], 10
    if flags & _FEXTRA:
        if pos + 2 > len(head):
            return False
        pos += 2 + int.from_bytes(head[pos : pos + 2], "little")
    for flag in (_FNAME, _FCOMMENT):
        if flags & flag:
            end = head.find(b"\0", pos)
            if end < 0:
                return False
            pos = end + 1
    return pos <= len(head)


_CORRUPT = (
    zipfile.BadZipFile,
    tarfile.TarError,
    EOFError,
    zlib.error,
    gzip.BadGzipFile,  # an OSError: caught before the store's own errors
    UnicodeDecodeError,  # a ZIP name flagged UTF-8 that is not
    ValueError,
    struct.error,
    IndexError,  # tarfile's header parsing on a cut or crafted header
    KeyError,
    OverflowError,
)


def _hash(drops: Location, name: str) -> str:
    digest = hashlib.sha256()
    with drops.open(name) as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def unpack_archive(drops: Location, archive: DropFile, budget: _Budget) -> list[DropFile]:
    """Unpack one archive into the drop; returns its members as files of the drop (written
    ones as listed now, refused ones with their reason). Raises :class:`ArchiveRefused`
    when it is to be quarantined whole, :class:`UnpackFailed` when the drop must wait,
    having deleted anything it wrote either way."""
    if archive.expected_sha256 and _hash(drops, archive.name) != archive.expected_sha256:
        raise ArchiveRefused(
            QuarantineReason.CHECKSUM_MISMATCH, "SHA-256 differs from the manifest"
        )
    job = _Unpacking(drops, archive, budget)
    job.clear_leftovers()
    kind = archive_kind(archive.name)
    try:
        with drops.open(archive.name) as fh:
            if kind == "zip":
                job.unpack_zip(fh)
            else:
                job.unpack_tar(fh, gz=kind == "tgz")
    except (ArchiveRefused, UnpackFailed):
        job.undo()
        raise
    except _CORRUPT as exc:
        job.undo()
        raise ArchiveRefused(
            QuarantineReason.ARCHIVE_CORRUPT, f"archive cannot be read ({type(exc).__name__})"
        ) from None
    except OSError as exc:
        job.undo()
        if exc.errno is not None and not is_file_problem(exc):
            raise  # the store's trouble: the task retries
        # No errno: a decompressor's complaint ("Invalid data stream"), not the store's.
        raise ArchiveRefused(
            QuarantineReason.ARCHIVE_CORRUPT, f"archive cannot be read ({type(exc).__name__})"
        ) from None
    written = set(job.written)
    listed = [e for e in job._listed() if e.name in written]
    return [file_from_entry(e) for e in listed] + job.refused


def _unpack_all(
    drops: Location,
    archive: DropFile,
    budget: _Budget,
    unpacked: list[str],
    nested: bool = False,
) -> Iterator[DropFile]:
    """The files ``archive`` turns into: its members, nested archives unpacked in turn
    (down to ``max_depth``, within the one budget), or the archive marked to be
    quarantined."""
    limits = budget.limits
    if depth_of(archive.name) > limits.max_depth:
        yield replace(
            archive,
            verdict=QuarantineReason.ARCHIVE_TOO_DEEP,
            verdict_detail=f"archive nested more than {limits.max_depth} deep",
        )
        return
    try:
        members = unpack_archive(drops, archive, budget)
    except OSError as exc:
        if exc.errno is not None and not is_file_problem(exc):
            raise  # the store's trouble: the task retries
        yield replace(archive, problem=read_problem(exc))  # reported, left in place
        return
    except ArchiveRefused as refused:
        if nested and refused.reason == QuarantineReason.ARCHIVE_TOO_LARGE:
            raise  # the dropped archive's budget ran out: it is refused whole
        yield replace(archive, verdict=refused.reason, verdict_detail=refused.detail)
        return
    unpacked.append(archive.name)
    for member in members:
        if archive_kind(member.name) and not member.problem:
            yield from _unpack_all(drops, member, budget, unpacked, nested=True)
        else:
            yield member


def _remove_unpacked(drops: Location, budget: _Budget, opened: list[str]) -> None:
    """What one dropped archive and those inside it wrote (nothing else)."""
    for name in sorted(set(budget.written), reverse=True):
        with contextlib.suppress(OSError):
            drops.delete(name, unchecked=True)
    for name in opened:
        with contextlib.suppress(OSError):
            drops.rmdir_empty(name + CONTENTS)


def drops_has(drops: Location, name: str) -> bool:
    """Whether a listed file is still there (the unpacking may have removed it)."""
    try:
        return drops.exists(name)
    except (OSError, UnsafeNameError):
        return True  # let ingest find out and report it


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
        budget = _Budget(limits, archive.size)
        opened: list[str] = []
        try:
            files.extend(list(_unpack_all(drops, archive, budget, opened)))
        except ArchiveRefused as refused:  # its nested archives together went past a bound
            _remove_unpacked(drops, budget, opened)
            files.append(replace(archive, verdict=refused.reason, verdict_detail=refused.detail))
            continue
        unpacked += opened
    # Files in an unpacking folder that no member wrote now (put there by the facility):
    # files of the drop like any other. A killed writer's partial files were removed.
    now_written = {f.name for f in files}
    files += [
        f
        for f in drop.files
        if f.name.startswith(prefixes)
        and f.name not in now_written
        and not f.name.rsplit("/", 1)[-1].startswith(TMP_PREFIX)
        and drops_has(drops, f.name)
    ]
    # A CD sent as an archive: its DICOMDIR sorts the members (the archive is whole, so a
    # file it references and lacks is only reported missing, not waited for).
    listed = tuple(a for a in archives if a.name in set(unpacked))
    drop = replace(drop, files=files, unpacked=tuple(unpacked), archives_listed=listed)
    return with_directories(drops, drop, 0.0, 1.0, wait=False)


def _inside(name: str, prefixes: tuple[str, ...], own: str) -> bool:
    return any(name.startswith(p) for p in prefixes if p != own)


def unpack_drops(drops: Location, ready: list[Drop], limits: ArchiveLimits) -> list[Drop]:
    """Every ready drop with its archives unpacked. A drop whose unpacking fails (its
    storage refused a write, or anything unforeseen) comes back ``waiting`` with why, so
    status and its receipt show it; it is tried again next run, logged by keyed id (an
    archive's name can be PHI), and the others go on."""
    out = []
    for drop in ready:
        try:
            out.append(unpack_drop(drops, drop, limits))
        except Exception as exc:
            if isinstance(exc, OSError) and exc.errno is not None and not is_file_problem(exc):
                raise  # the store's trouble: the task retries
            why = f"unpacking failed ({type(exc).__name__}); tried again next run"
            log.warning("drop %s/%s: %s", drop.facility_id, drop.drop_id, why)
            out.append(replace(drop, state="waiting", why=why))  # reported, not dropped
    return out


unpack_drops_task = task(
    name="unpack-archives",
    retries=2,
    retry_condition_fn=retry_transient,
    retry_delay_seconds=[1, 5],
    cache_policy=NO_CACHE,
)(unpack_drops)
