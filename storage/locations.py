"""fsspec URL locations: ``file://``, ``memory://`` and ``s3://`` behind one small API.

A :class:`Location` is a root URL plus a filesystem. Every relative name that
reaches it goes through :func:`safe_relpath`, so a hostile name from a drop
(``..``, an absolute path, a NUL byte) cannot escape the root.

Writes are atomic: local and memory stores write to a temporary sibling and
rename; S3 writes are a single PUT (or a completed multipart upload), which
S3 itself makes visible only when whole.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import functools
import io
import ipaddress
import os
import posixpath
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from dropvault.storage.errors import TerminalError

COPY_CHUNK = 4 * 1024 * 1024
# An object store's read-ahead and upload-part size: s3fs's default (50 MiB) is held per open
# file, and ingest opens a large file up to three times (hash, header, encrypt) besides the
# upload it writes. 5 MiB, S3's least part size, keeps a worker's peak within 300 MB on S3
# (measured 293-295 MB against 310-317 MB with 8 MiB; benchmarks/ingest_large_s3.py).
# Parts of 5 MiB allow objects up to ~48 GiB (10,000 parts), past DROPVAULT_MAX_FILE_BYTES.
OBJECT_STORE_BLOCK = 5 * 1024 * 1024


class UnsafeNameError(TerminalError, ValueError):
    """A relative name would escape its location (``..``, absolute path, NUL, empty part)."""


class NotRegularFileError(TerminalError, OSError):
    """What was opened is not a regular file inside its location: a symlink, a special
    file, or a path whose folders were swapped for symlinks after it was listed."""


class InsecureEndpointError(TerminalError, ValueError):
    """A remote object-store endpoint that is not loopback must use TLS (promise P2)."""


def safe_relpath(*parts: str) -> str:
    """Join relative name parts into one POSIX relative path, refusing escapes.

    Each part may itself contain ``/``. Refused: NUL bytes, backslashes, absolute
    paths, drive letters, ``.``/``..`` segments and empty segments.
    """
    segments: list[str] = []
    for part in parts:
        if not isinstance(part, str):
            raise UnsafeNameError("name is not a string")
        if "\x00" in part:
            raise UnsafeNameError("name contains a NUL byte")
        try:
            part.encode("utf-8")
        except UnicodeEncodeError:  # bytes the filesystem held that are not UTF-8
            raise UnsafeNameError("name is not valid UTF-8") from None
        if "\\" in part:
            raise UnsafeNameError("name contains a backslash")
        if part.startswith("/"):
            raise UnsafeNameError("name is absolute")
        if len(part) >= 2 and part[1] == ":":
            raise UnsafeNameError("name has a drive letter")
        for seg in part.split("/"):
            if seg in ("", ".", ".."):
                raise UnsafeNameError("name has an empty, '.' or '..' segment")
            segments.append(seg)
    if not segments:
        raise UnsafeNameError("name is empty")
    return "/".join(segments)


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_safe_name(name: str) -> bool:
    """Whether :func:`safe_relpath` accepts ``name``."""
    try:
        safe_relpath(name)
    except UnsafeNameError:
        return False
    return True


def check_endpoint_tls(endpoint_url: str | None) -> None:
    """Refuse plain-HTTP endpoints unless they are on loopback (test endpoints)."""
    if endpoint_url is None:
        return  # AWS default endpoints are HTTPS
    parts = urlsplit(endpoint_url)
    if parts.scheme == "https":
        return
    if parts.scheme == "http" and is_loopback_host(parts.hostname):
        return
    raise InsecureEndpointError(
        f"object-store endpoint {parts.scheme}://{parts.hostname} must use https "
        "(plain http is allowed only on loopback)"
    )


@dataclass(frozen=True)
class Entry:
    """One listed object: ``name`` is relative to the location root."""

    name: str
    size: int
    mtime: float  # seconds since the epoch, UTC
    # The object store's ETag (mtime is only to the second); on local disk, inode:ctime_ns.
    tag: str = ""
    problem: str = ""  # why it cannot be read (local disks): a symlink, a special file, ...


class FullReads(io.RawIOBase):
    """A read stream whose ``read(n)`` returns ``n`` bytes unless the object ends.

    A remote stream may return fewer bytes than asked (a short read); parsers such as
    pydicom take a short read for the end of the file.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        super().__init__()
        self._raw = raw

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return self._raw.read()
        parts = []
        while size > 0:
            chunk = self._raw.read(size)
            if not chunk:
                break
            parts.append(chunk)
            size -= len(chunk)
        return b"".join(parts)

    def readall(self) -> bytes:
        return self._raw.read()

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()

    def __getattr__(self, name: str) -> Any:
        if name == "_raw":  # not set yet (a failed __init__): no recursion
            raise AttributeError(name)
        return getattr(self._raw, name)


# Errors that belong to one file, not to the store: retrying cannot help, and the other
# files are readable. Anything else (an I/O error, a 503 from S3, a dropped connection) is
# the store's and is raised, so the task's retries take it.
_FILE_ERRNOS = frozenset(
    {
        errno.EACCES,
        errno.EPERM,
        errno.ELOOP,
        errno.ENAMETOOLONG,
        errno.EISDIR,
        errno.ENOTDIR,
        errno.ENXIO,
        errno.ENODEV,
        errno.EINVAL,
        errno.ENOTEMPTY,  # a folder that got a file between the listing and its removal
        errno.EBUSY,
        errno.EROFS,
    }
)


def _unlink_beneath(root: str, path: str) -> None:
    """Unlink ``path`` below ``root`` without following a symlink on the way: each folder
    is opened relative to the one before with ``O_NOFOLLOW``, so a folder swapped for a
    symlink after the listing cannot send the unlink outside the location (ELOOP)."""
    top = root.rstrip("/")
    if not path.startswith(top + "/"):
        raise UnsafeNameError("a path outside its location")
    *folders, leaf = path[len(top) + 1 :].split("/")
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in folders:
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = inner
        os.unlink(leaf, dir_fd=fd)
    finally:
        os.close(fd)


def _parent_beneath(root: str, path: str) -> tuple[int, str]:
    """Open the folder holding ``path`` below ``root`` without following a symlink on the
    way (each folder opened relative to the one before with ``O_NOFOLLOW``; missing ones
    made), so a folder that is a symlink cannot send a write outside the location (ELOOP).
    Returns the folder's descriptor (the caller closes it) and the leaf name."""
    top = root.rstrip("/")
    if not path.startswith(top + "/"):
        raise UnsafeNameError("a path outside its location")
    *folders, leaf = path[len(top) + 1 :].split("/")
    try:
        fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:  # the location's own root, made on first write
        Path(top).mkdir(parents=True, exist_ok=True)
        fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in folders:
            try:
                inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, dir_fd=fd)
                inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd, leaf


def _local_tag(info: os.stat_result) -> str:
    """A local file's tag: inode and change time, so a file rewritten in place with its size
    and mtime put back (``cp -p``, ``rsync -t``) is not taken for the one listed."""
    return f"{info.st_ino}:{info.st_ctime_ns}"


def _not_a_folder(path: str, start: int) -> builtins.list[Entry] | None:
    """What listing ``path`` gives when it is not a folder that can be read: nothing (gone),
    the file itself, or one entry with a ``problem`` (a symlink, a FIFO, no permission);
    None for a folder to walk."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return []
    except OSError as exc:
        if not is_file_problem(exc):
            raise
        return [Entry(path[start:], 0, 0.0, problem=read_problem(exc))]
    if stat.S_ISDIR(info.st_mode):
        return None
    if stat.S_ISREG(info.st_mode):
        return [Entry(path[start:], info.st_size, info.st_mtime, _local_tag(info))]
    kind = "a symlink" if stat.S_ISLNK(info.st_mode) else "a special file"
    return [Entry(path[start:], 0, info.st_mtime, problem=f"{kind}, not a regular file")]


def is_file_problem(exc: OSError) -> bool:
    """Whether ``exc`` says this one file cannot be read (see :data:`_FILE_ERRNOS`)."""
    if is_changed_source(exc):
        return False  # s3fs's FileExpired (EBUSY): changed, not unreadable
    return isinstance(exc, PermissionError | NotRegularFileError) or exc.errno in _FILE_ERRNOS


def is_changed_source(exc: OSError) -> bool:
    """Whether ``exc`` says the object changed under an open read handle: s3fs pins each
    ranged read to the ETag it opened and raises its ``FileExpired`` on another version
    (matched by name: this module does not import s3fs)."""
    return type(exc).__name__ == "FileExpired"


def read_problem(exc: OSError) -> str:
    """A PHI-free reason why a file cannot be read (an OSError's message has the path)."""
    if isinstance(exc, NotRegularFileError):
        return str(exc.strerror)
    name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
    return f"cannot be read ({name})"


def _mtime(info: dict[str, Any]) -> float:
    for key in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, datetime):
            if value.tzinfo is None:
                value = value.replace(tzinfo=UTC)
            return value.timestamp()
        return float(value)
    return 0.0


def filesystem_for(url: str, storage_options: dict[str, Any] | None = None) -> AbstractFileSystem:
    """Build the fsspec filesystem for ``url``; S3 gets fresh listings and a TLS check."""
    protocol = urlsplit(url).scheme or "file"
    options = dict(storage_options or {})
    if protocol in ("s3", "s3a"):
        endpoint = options.get("endpoint_url") or options.get("client_kwargs", {}).get(
            "endpoint_url"
        )
        check_endpoint_tls(endpoint)
        # Listings go stale across clients (TRAPS): a watcher must never trust a cache.
        options.setdefault("use_listings_cache", False)
    fs: AbstractFileSystem = fsspec.filesystem(protocol, **options)
    return fs


class Location:
    """A root URL on one filesystem, with safe joins and atomic writes."""

    def __init__(
        self,
        url: str,
        fs: AbstractFileSystem | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.fs = fs if fs is not None else filesystem_for(self.url, storage_options)
        self.protocol = urlsplit(self.url).scheme or "file"
        root = self.fs._strip_protocol(self.url)
        self.root: str = root.rstrip("/") if root != "/" else root
        self._storage_options = storage_options

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    @property
    def is_local(self) -> bool:
        return self.protocol in ("file", "local")

    @property
    def is_object_store(self) -> bool:
        """An S3-compatible bucket: no folders, atomic PUTs, maybe versioned."""
        return self.protocol in ("s3", "s3a")

    @property
    def versioned(self) -> bool:
        checker = getattr(self.fs, "is_bucket_versioned", None)
        if checker is None:
            return False
        bucket = self.root.split("/", 1)[0]
        return bool(checker(bucket))

    def child(self, *parts: str) -> Location:
        """A sub-location sharing this filesystem."""
        return Location(f"{self.url}/{safe_relpath(*parts)}", fs=self.fs)

    def path(self, *parts: str) -> str:
        """Filesystem path of a relative name (checked)."""
        return f"{self.root}/{safe_relpath(*parts)}"

    def uri(self, *parts: str) -> str:
        return f"{self.url}/{safe_relpath(*parts)}"

    def relative(self, path: str) -> str:
        """The name of an absolute filesystem path below this root (not checked for safety)."""
        stripped = self.fs._strip_protocol(path)
        prefix = self.root.rstrip("/") + "/"
        if not stripped.startswith(prefix):
            raise UnsafeNameError("path is outside the location")
        return stripped[len(prefix) :]

    def ensure(self) -> None:
        """Create the root (a no-op on object stores)."""
        if not self.is_object_store:
            self.fs.makedirs(self.root, exist_ok=True)

    def _invalidate(self, path: str | None = None) -> None:
        self.fs.invalidate_cache(path or self.root)

    def list(
        self, prefix: str = "", *, recursive: bool = True, unchecked: bool = False
    ) -> builtins.list[Entry]:
        """Every object below ``prefix``, with size and mtime. Never cached.

        ``recursive=False``: only the objects directly in ``prefix``, not in its folders.
        ``unchecked``: ``prefix`` is a name this location listed (it may not be UTF-8).
        """
        base = self.root
        if prefix:
            base = f"{self.root}/{prefix if unchecked else safe_relpath(prefix)}"
        if self._on_local_disk:
            return self._list_local(base, recursive)
        self._invalidate(base)
        if not self.fs.exists(base):
            return []
        if recursive:
            found = self.fs.find(base, detail=True)
        else:
            found = {info["name"]: info for info in self.fs.ls(base, detail=True)}
        entries = []
        for path, info in sorted(found.items()):
            if info.get("type") == "directory":
                continue
            entries.append(
                Entry(
                    name=self.relative(path),
                    size=int(info.get("size") or 0),
                    mtime=_mtime(info),
                    tag=str(info.get("ETag") or ""),
                )
            )
        return entries

    def _list_local(self, base: str, recursive: bool) -> builtins.list[Entry]:
        """:meth:`list` on a local disk with ``os.scandir`` (fsspec adds ~100 us a file).

        Nothing here follows a symlink. A symlink, a special file, or a folder that cannot be
        listed (permissions, a path past the length limit) is an entry with a ``problem``, so
        the caller reports it instead of failing or skipping it silently.
        """
        entries = []
        start = len(self.root.rstrip("/")) + 1
        if base != self.root:
            odd = _not_a_folder(base, start)
            if odd is not None:
                return odd
        stack = [base]
        while stack:
            folder = stack.pop()
            try:
                items = list(os.scandir(folder))
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                if (folder == self.root) or not is_file_problem(exc):
                    raise  # the location's own root: the operator's to fix, said plainly
                entries.append(Entry(folder[start:], 0, 0.0, problem=read_problem(exc)))
                continue
            for item in items:
                entry = self._local_entry(item, start, recursive, stack)
                if entry is not None:
                    entries.append(entry)
        return sorted(entries, key=lambda e: e.name)

    @staticmethod
    def _local_entry(
        item: os.DirEntry[str], start: int, recursive: bool, stack: builtins.list[str]
    ) -> Entry | None:
        try:
            if item.is_dir(follow_symlinks=False):
                if recursive:
                    stack.append(item.path)
                return None
            info = item.stat(follow_symlinks=False)
        except FileNotFoundError:
            return None  # gone since the folder was read
        except OSError as exc:
            if not is_file_problem(exc):
                raise
            return Entry(item.path[start:], 0, 0.0, problem=read_problem(exc))
        if item.is_file(follow_symlinks=False):
            return Entry(item.path[start:], info.st_size, info.st_mtime, _local_tag(info))
        kind = "a symlink" if item.is_symlink() else "a special file"
        return Entry(item.path[start:], 0, info.st_mtime, problem=f"{kind}, not a regular file")

    def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        """Immediate child directory names below ``prefix``."""
        base = f"{self.root}/{safe_relpath(prefix)}" if prefix else self.root
        self._invalidate(base)
        if not self.fs.exists(base):
            return []
        names = []
        for info in self.fs.ls(base, detail=True):
            if info.get("type") == "directory":
                names.append(posixpath.basename(info["name"].rstrip("/")))
        return sorted(names)

    def exists(self, name: str) -> bool:
        path = self.path(name)
        self._invalidate(posixpath.dirname(path))
        return bool(self.fs.exists(path))

    def size(self, name: str) -> int:
        return int(self.fs.info(self.path(name))["size"])

    def _open_local(self, path: str) -> int:
        """A read descriptor for a regular file at ``path`` that no symlink redirected: the
        last part is opened with ``O_NOFOLLOW``, and on Linux the opened file's own path
        must be ``path`` under the real root (a folder swapped for a symlink after the
        listing would lead elsewhere)."""
        # O_NONBLOCK: opening a FIFO put in a file's place must not wait for a writer (it is
        # then refused as not regular); reads of a regular file are unaffected by it.
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0))
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise NotRegularFileError(errno.EINVAL, "not a regular file")
            try:  # Linux: where the descriptor really points (one call, on the hot path)
                really = os.readlink(f"/proc/self/fd/{fd}")  # noqa: PTH115
            except OSError:
                really = None  # no /proc: O_NOFOLLOW alone
            if really is not None and really != self._real_root + path[len(self.root) :]:
                if really.endswith(" (deleted)"):
                    raise FileNotFoundError(errno.ENOENT, "removed while being opened")
                raise NotRegularFileError(errno.ELOOP, "path leads outside its location")
        except BaseException:
            os.close(fd)
            raise
        return fd

    @functools.cached_property
    def _real_root(self) -> str:
        return os.path.realpath(self.root)

    @property
    def _on_local_disk(self) -> bool:
        # Plain os calls on a local disk: fsspec's layers cost more than the I/O for small files.
        return isinstance(self.fs, LocalFileSystem)

    def open(self, name: str, mode: str = "rb", *, unchecked: bool = False) -> IO[bytes]:
        """Streaming read. ``unchecked`` takes a listed raw name as is (for unsafe names)."""
        path = f"{self.root}/{name}" if unchecked else self.path(name)
        if mode == "rb" and self._on_local_disk:
            return os.fdopen(self._open_local(path), "rb")
        handle: IO[bytes] = self.fs.open(path, mode, **self._buffering)
        if mode == "rb":
            return FullReads(handle)  # type: ignore[return-value]
        return handle

    @property
    def has_change_tokens(self) -> bool:
        """Whether :meth:`change_token` can tell that a source changed between two reads."""
        return self._on_local_disk or self.is_object_store

    def change_token(self, handle: IO[bytes]) -> str | None:
        """What identifies the bytes an open read handle (from :meth:`open`) reads, or None
        where this store cannot say. Local disk: inode, size, and modification and change
        times in ns (GNU tar's "file changed as we read it" test: any write moves the
        change time, which no one can set back). Object store: the ETag, which s3fs pins
        every ranged read of the handle to (``IfMatch``), so a replaced object fails the
        read instead of mixing versions."""
        if self._on_local_disk:
            st = os.fstat(handle.fileno())
            return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
        if self.is_object_store:
            details = getattr(handle, "details", None) or {}
            tag = details.get("ETag")
            return f"{tag}:{details.get('size')}" if tag else None
        return None

    @property
    def _buffering(self) -> dict[str, Any]:
        return {"block_size": OBJECT_STORE_BLOCK} if self.is_object_store else {}

    def read_bytes(self, name: str, *, unchecked: bool = False, limit: int = -1) -> bytes:
        """The object's bytes; ``limit``: at most that many."""
        if self._on_local_disk:
            path = f"{self.root}/{name}" if unchecked else self.path(name)
            with os.fdopen(self._open_local(path), "rb") as fh:
                return fh.read(limit)
        with self.open(name, unchecked=unchecked) as fh:
            return fh.read(limit)

    def flush(self) -> None:
        """Make what was written durable before it is cataloged.

        Local files are flushed with one ``sync`` per batch (an fsync per file costs ~0.5 ms);
        an object store has nothing to flush, since a completed PUT is durable.
        """
        if self._on_local_disk:
            os.sync()

    @contextmanager
    def writer(self, name: str, *, fresh: bool = False) -> Iterator[IO[bytes]]:
        """Atomic streaming write: readers see the old object or the whole new one.

        ``fresh``: the name is new and nothing reads it until the catalog points at it (a
        vault object), so a local write goes straight to the name instead of through a
        temporary file and a rename; a crash leaves an orphan that reconcile removes.
        """
        final = self.path(name)
        if self.is_object_store:
            # One PUT or a completed multipart upload: S3 publishes it whole or not at all.
            handle: Any = self.fs.open(final, "wb", **self._buffering)
            try:
                yield handle
            except BaseException:
                # Closing would PUT the partial buffer: abort the upload instead.
                handle.discard()
                handle.closed = True
                raise
            try:
                handle.close()  # uploads the last part and completes the upload
            except BaseException:
                handle.discard()  # a part that failed here: abort, leave no upload behind
                handle.closed = True
                raise
            return
        parent = posixpath.dirname(final)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        if self._on_local_disk:
            # Beneath the root, never through a symlinked folder (a facility's own folders
            # are theirs to make into symlinks: receipts and releases write into them).
            folder_fd, leaf = _parent_beneath(self.root, final)
            target = leaf if fresh else posixpath.basename(tmp)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            try:
                local = os.fdopen(os.open(target, flags, 0o666, dir_fd=folder_fd), "wb")
                # ``fresh`` goes straight to its name; otherwise a temporary file is renamed.
                try:
                    with local:
                        yield local
                    if not fresh:
                        os.replace(target, leaf, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
                except BaseException:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(target, dir_fd=folder_fd)
                    raise
            finally:
                os.close(folder_fd)
            return
        self.fs.makedirs(parent, exist_ok=True)
        try:
            with self.fs.open(tmp, "wb") as fh:
                yield fh
            self._move_exact(tmp, final)
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm_file(tmp)
            raise

    def put_bytes(self, name: str, data: bytes) -> None:
        with self.writer(name) as fh:
            fh.write(data)

    def put_stream(self, name: str, stream: IO[bytes]) -> int:
        total = 0
        with self.writer(name) as fh:
            while chunk := stream.read(COPY_CHUNK):
                fh.write(chunk)
                total += len(chunk)
        return total

    def move(self, name: str, dest: Location, dest_name: str, *, unchecked: bool = False) -> None:
        """Move one object, possibly across filesystems (copy, then delete the source).
        ``unchecked``: ``name`` is a raw name this location listed (it may be unsafe)."""
        source = f"{self.root}/{name}" if unchecked else self.path(name)
        if dest.fs is self.fs or (dest.protocol == self.protocol == "file"):
            dest_path = dest.path(dest_name)
            if not self.is_object_store:
                self.fs.makedirs(posixpath.dirname(dest_path), exist_ok=True)
            if self._on_local_disk:
                Path(source).rename(dest_path)  # the entry itself, even a symlink or FIFO
            else:
                self._move_exact(source, dest_path)
                if self.is_object_store and self.versioned:
                    # A move is a copy and a delete: the source's versions (and the delete
                    # marker the move left) would keep its bytes readable. None stays.
                    self.delete(name, unchecked=unchecked)
            return
        with self.open(name, unchecked=unchecked) as src:
            dest.put_stream(dest_name, src)
        self.delete(name, unchecked=unchecked)

    def delete(self, name: str, *, unchecked: bool = False) -> int:
        """Delete an object and, on a versioned bucket, every version of it.

        Returns how many objects or versions were removed.
        """
        path = f"{self.root}/{name}" if unchecked else self.path(name)
        removed = 0
        if self.is_object_store and self.versioned:
            for version in self.versions(name, unchecked=unchecked):
                self._delete_version(path, version)
                removed += 1
            self._invalidate(posixpath.dirname(path))
            return removed
        self._invalidate(posixpath.dirname(path))
        if self._on_local_disk:
            try:
                _unlink_beneath(self.root, path)
            except FileNotFoundError:
                return 0
            return 1
        if self.fs.exists(path):
            self.fs.rm_file(path)  # the exact key: rm would expand *, ? and [ ] as a glob
            removed = 1
        return removed

    def _move_exact(self, source: str, dest: str) -> None:
        """Copy then delete one object by its exact key (``mv`` expands glob characters, and
        a drop may be named ``*``)."""
        self.fs.cp_file(source, dest)
        self.fs.rm_file(source)

    def rewrite(self, name: str, data: bytes) -> None:
        """Replace an object's bytes so that no earlier content survives: written atomically,
        then, on a versioned bucket, every version but the new one removed."""
        self.put_bytes(name, data)
        if not (self.is_object_store and self.versioned):
            return
        latest = self._latest_version(name)
        for version in self.versions(name):
            if version != latest:
                self._delete_version(self.path(name), version)

    def _latest_version(self, name: str) -> str | None:
        from fsspec.asyn import sync

        bucket, key = self.path(name).split("/", 1)
        fs: Any = self.fs
        head = sync(fs.loop, fs._call_s3, "head_object", Bucket=bucket, Key=key)
        return head.get("VersionId")

    def remaining(self, name: str) -> int:
        """What is left of an object: its versions and delete markers on a versioned bucket,
        else 1 if it exists. A deletion is proven when this is 0."""
        if self.is_object_store and self.versioned:
            return len(self.versions(name))
        return int(self.exists(name))

    def versions(self, name: str, *, unchecked: bool = False) -> builtins.list[str]:
        """Every version id (and delete marker) of an object on a versioned bucket, across
        as many listing pages as it takes (S3 returns at most 1,000 per call)."""
        path = f"{self.root}/{name}" if unchecked else self.path(name)
        key = path.split("/", 1)[1]
        return [v["VersionId"] for v in self._version_items(path) if v["Key"] == key]

    def _version_items(self, prefix_path: str) -> Iterator[dict[str, Any]]:
        """Every version and delete marker under a path prefix (``Marker`` set on delete
        markers), across as many listing pages as it takes (S3 gives 1,000 per call)."""
        bucket, key = (prefix_path.split("/", 1) + [""])[:2]
        from fsspec.asyn import sync  # local: only object stores need it

        fs: Any = self.fs
        marks: dict[str, str] = {}
        while True:
            resp = sync(
                fs.loop, fs._call_s3, "list_object_versions", Bucket=bucket, Prefix=key, **marks
            )
            yield from resp.get("Versions", [])
            yield from ({**m, "Marker": True} for m in resp.get("DeleteMarkers", []))
            if not resp.get("IsTruncated"):
                return
            marks = {
                "KeyMarker": resp["NextKeyMarker"],
                "VersionIdMarker": resp["NextVersionIdMarker"],
            }

    def old_versions(self) -> builtins.list[tuple[str, str, bool]]:
        """``(bucket/key, version id, is a delete marker)`` of every noncurrent version and
        delete marker below this location on a versioned bucket (none elsewhere)."""
        if not (self.is_object_store and self.versioned):
            return []
        bucket = self.root.split("/", 1)[0]
        return [
            (f"{bucket}/{v['Key']}", str(v["VersionId"]), bool(v.get("Marker")))
            for v in self._version_items(self.root + "/")
            if v.get("Marker") or not v.get("IsLatest")
        ]

    def read_version(self, path: str, version: str) -> bytes:
        """The bytes of one version (``path`` as :meth:`old_versions` gives it)."""
        from fsspec.asyn import sync

        bucket, key = path.split("/", 1)
        fs: Any = self.fs
        body = sync(fs.loop, fs._call_s3, "get_object", Bucket=bucket, Key=key, VersionId=version)[
            "Body"
        ]
        return bytes(sync(fs.loop, body.read))

    def purge_old_versions(self) -> int:
        """Delete every noncurrent version and delete marker below this location (a store
        whose history must not outlive a deletion, such as a lake's data files)."""
        old = self.old_versions()
        for path, version, _ in old:
            self._delete_version(path, version)
        return len(old)

    def duckdb_source(self, con: Any, name: str) -> str:
        """A path to ``name`` that DuckDB connection ``con`` can read: a local path as it
        is, anything else through this location's fsspec filesystem, registered once."""
        if self.is_local:
            return self.path(name)
        fs_protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        if fs_protocol not in con.list_filesystems():
            con.register_filesystem(self.fs)
        return f"{self.protocol}://{self.path(name).lstrip('/')}"

    def _delete_version(self, path: str, version: str) -> None:
        from fsspec.asyn import sync

        bucket, key = path.split("/", 1)
        fs: Any = self.fs
        sync(fs.loop, fs._call_s3, "delete_object", Bucket=bucket, Key=key, VersionId=version)

    def rmdir_empty(self, prefix: str, *, unchecked: bool = False) -> None:
        """Remove empty directories left below ``prefix`` (local and memory stores); never
        through a symlink. ``unchecked``: ``prefix`` is a name this location listed."""
        if self.is_object_store:
            return
        base = f"{self.root}/{prefix}" if unchecked else self.path(prefix)
        if self.is_local:
            root = Path(base)
            if root.is_symlink() or not root.is_dir():
                return  # gone, a symlink, or a FIFO or file where a folder was
            folders = (p for p in root.rglob("*") if p.is_dir() and not p.is_symlink())
            for d in sorted(folders, reverse=True):
                if not any(d.iterdir()):
                    d.rmdir()
            if not any(root.iterdir()):
                root.rmdir()
            return
        if not self.fs.exists(base) or self.fs.find(base):
            return
        # Folder by folder, by exact name: rm(recursive=True) would expand a * in the name.
        folders = self.fs.find(base, withdirs=True, detail=True)
        paths = sorted((p for p, i in folders.items() if i["type"] == "directory"), reverse=True)
        for path in [*paths, base]:
            with contextlib.suppress(FileNotFoundError):  # implied by its files, never made
                self.fs.rmdir(path)
