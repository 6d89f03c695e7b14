"""Key-encryption key (KEK) and per-study record keys.

* The KEK is 32 random bytes. In the embedded default it lives in a key file
  created with mode 0600; in production it is passed in (Prefect Secret block
  or environment, read by ``flows/settings.py``).
* Record keys are 32 random bytes each, wrapped with RFC 3394 AES key wrap
  under the KEK, and kept in a SQLite file with ``PRAGMA secure_delete=ON``
  and a rollback journal, so a destroyed key's bytes are overwritten in the
  file rather than left in a free page or a WAL.
* Rotation re-wraps every record key under a new KEK; no object is
  re-encrypted, because objects carry data keys wrapped by record keys. The
  re-wrap and the record of the current KEK (``keystore_meta``: ``kek_id``,
  ``kek_check``) are one transaction, so a process that opened the keystore before
  a rotation notices it at its next key operation: it reloads the key file
  (embedded default) or stops with :class:`KEKRotatedError` (a KEK given as a
  setting), and never wraps a new key under the discarded KEK.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sqlite3
import stat
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap,
    aes_key_wrap,
)

from dropvault.storage.errors import TerminalError

KEY_BYTES = 32


class KeyError_(TerminalError, LookupError):
    """Base for keystore errors (named apart from the builtin KeyError)."""


class KeyDestroyedError(KeyError_):
    """The record key was destroyed (crypto-shredded): its data is unreadable for good."""


class UnknownKeyError(KeyError_):
    """No record key with that id."""


class WrongKEKError(KeyError_):
    """The KEK does not unwrap this keystore's record keys."""


class MissingKEKError(KeyError_):
    """The keystore holds record keys but the KEK that wraps them is not there."""


class KEKRotatedError(KeyError_):
    """The KEK was rotated after this process opened the keystore, and the new one cannot
    be loaded here (it was given as a setting): restart with the new KEK."""


# Fault-injection points for the rotation tests: name -> callable.
FAULTS: dict[str, Callable[[], None]] = {}


def _fault(point: str) -> None:
    hook = FAULTS.get(point)
    if hook is not None:
        hook()


class MissingKeystoreError(KeyError_):
    """The keystore file is missing or empty: its record keys cannot be made again."""


def stored_key_count(store_file: Path) -> int:
    """How many record keys (live or destroyed) a keystore file holds; 0 without one."""
    if not store_file.exists() or store_file.stat().st_size == 0:
        return 0
    with closing(sqlite3.connect(store_file)) as con:
        try:
            return int(con.execute("SELECT count(*) FROM record_keys").fetchone()[0])
        except sqlite3.OperationalError:
            return 0


def private_dir(path: Path) -> None:
    """Create ``path`` (and parents) and make it 0700: only the owner may list the keys."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)


def write_secret_file(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 from the start (no window where it is readable),
    whole: the bytes go to a private temporary file that is then hard-linked into place,
    so a second process never sees it empty. Raises ``FileExistsError`` if it exists."""
    private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)  # atomic create-if-absent
    finally:
        tmp.unlink(missing_ok=True)


class KeyFileError(TerminalError, ValueError):
    """A key file is not a private regular file of the right size."""


def check_private(path: Path, what: str = "key file") -> os.stat_result:
    """Refuse a key file, keystore or keys folder that is a symlink, not ours, or open to
    others (the folder: mode 0700; a file: no group or other bits)."""
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode):
        raise KeyFileError(f"{what} {path.name} is a symlink: keys must be plain files")
    _owner_only(info, path.name, what)
    return info


def _owner_only(info: os.stat_result, name: str, what: str) -> None:
    if info.st_uid != os.getuid():
        raise KeyFileError(f"{what} {name} belongs to another user")
    if info.st_mode & 0o077:
        raise KeyFileError(
            f"{what} {name} is open to others (mode {stat.S_IMODE(info.st_mode):04o}):"
            f" chmod {'700' if stat.S_ISDIR(info.st_mode) else '600'} it"
        )


def load_secret(path: Path, size: int = KEY_BYTES) -> bytes:
    """Read a key file. Never creates one: keys are made once, by ``dropvault init``
    (:func:`create_secret`); a missing file raises ``FileNotFoundError``.

    The file must be a regular file (not a symlink, device or FIFO), readable by its
    owner only (no group or other bits), of exactly ``size`` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise KeyFileError(f"key file {path.name} cannot be opened (a symlink?)") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"key file {path.name} is not a regular file")
        _owner_only(info, path.name, "key file")
        data = fh.read(size + 1)
    if len(data) != size:
        raise KeyFileError(f"key file {path.name} must hold exactly {size} bytes")
    return data


def create_secret(path: Path, size: int = KEY_BYTES) -> bytes:
    """Make a new random key file (0600); ``FileExistsError`` if one is there already."""
    data = secrets.token_bytes(size)
    write_secret_file(path, data)
    return data


def check_value(key: bytes) -> str:
    """A public check value of a key: HMAC-SHA256 of a constant under it (never the key).

    Recorded when a home is made, compared at every start, so a missing or different
    key stops the run instead of silently making or using another."""
    return hmac.new(key, b"dropvault key check value v1", hashlib.sha256).hexdigest()[:32]


def kek_id(kek: bytes) -> str:
    """A public fingerprint of a KEK, to tell which KEK wrapped a record key."""
    return hashlib.sha256(b"dropvault-kek-id\x00" + kek).hexdigest()[:16]


def _settle_pending(directory: Path) -> None:
    """A ``kek.key.new`` a rotation left: promoted when its re-wrap committed, else removed.

    Decided under the keystore's write lock. A rotation writes the file inside its own
    transaction (:meth:`Keystore.rotate_local`), so while this holds the lock no rotation is
    between writing the file and committing: the file is either committed or abandoned."""
    pending = directory / "kek.key.new"
    store_file = directory / Keystore.FILE
    if not pending.exists() or not store_file.exists():
        return
    with closing(sqlite3.connect(store_file, timeout=60, isolation_level=None)) as con:
        con.execute("BEGIN IMMEDIATE")
        try:
            if not pending.exists():
                return  # another process settled it meanwhile
            new = load_secret(pending)
            try:
                row = con.execute(
                    "SELECT value FROM keystore_meta WHERE name = 'kek_id'"
                ).fetchone()
                sample = con.execute(
                    "SELECT wrapped FROM record_keys WHERE destroyed_at IS NULL LIMIT 1"
                ).fetchone()
            except sqlite3.OperationalError:
                row = sample = None  # an empty or older keystore
            if row is not None:
                committed = row[0] == kek_id(new)
            else:  # rotated before keystore_meta recorded the KEK: the keys tell
                committed = sample is not None and _unwraps(new, sample[0])
            if committed:
                pending.replace(directory / "kek.key")
            else:
                pending.unlink()
        finally:
            con.execute("COMMIT")


def _unwraps(kek: bytes, wrapped: bytes) -> bool:
    try:
        aes_key_unwrap(kek, wrapped)
    except InvalidUnwrap:
        return False
    return True


def _key_file(directory: Path, want: str) -> bytes | None:
    """The KEK with id ``want`` from the key files (a rotation's new file first)."""
    for name in ("kek.key.new", "kek.key"):
        try:
            kek = load_secret(directory / name)
        except (FileNotFoundError, KeyFileError):
            continue
        if kek_id(kek) == want:
            return kek
    return None


class Keystore:
    """Record keys wrapped by a KEK, in a SQLite file under ``directory``."""

    FILE = "keystore.sqlite"

    def __init__(
        self,
        directory: Path,
        kek: bytes,
        create: bool = False,
        reload: Callable[[str], bytes | None] | None = None,
    ) -> None:
        """Open the keystore under ``directory``; only ``create`` (``dropvault init``) may
        make the file. A missing or empty one raises :class:`MissingKeystoreError`: making
        a new one would strand every object sealed under the old record keys."""
        if len(kek) != KEY_BYTES:
            raise ValueError("the KEK must be 32 bytes (AES-256)")
        self.directory = Path(directory)
        self.path = self.directory / self.FILE
        self._kek = kek
        # Loads the KEK with this id after a rotation by another process (the key file);
        # None: the KEK was given as a setting and cannot change under a running process.
        self._reload = reload
        self._cache: dict[str, bytes] = {}
        self.keystore_id = ""
        if not create and not self._has_table():
            raise MissingKeystoreError(
                f"{self.directory.name}/{self.FILE} is missing, empty or not a keystore:"
                " restore it from a backup (record keys cannot be made again)"
            )
        if not self.path.exists() or self.path.stat().st_size == 0:
            private_dir(self.directory)
            # Create the file 0600 before SQLite opens it (two workers may race here).
            with suppress(FileExistsError):
                write_secret_file(self.path, b"")
        check_private(self.directory, "keys folder")
        check_private(self.path, "keystore")
        with self._connect() as con:
            con.execute(
                "CREATE TABLE IF NOT EXISTS record_keys ("
                " key_id TEXT PRIMARY KEY, wrapped BLOB, kek_id TEXT NOT NULL,"
                " created_at TEXT NOT NULL, destroyed_at TEXT)"
            )
            # An id of this keystore, recorded in the home: another keystore (an empty one,
            # or another home's) is refused at start instead of being used.
            con.execute(
                "CREATE TABLE IF NOT EXISTS keystore_meta (name TEXT PRIMARY KEY, value TEXT)"
            )
            con.execute(
                "INSERT OR IGNORE INTO keystore_meta VALUES ('keystore_id', ?)",
                ("ks_" + secrets.token_hex(12),),
            )
            self.keystore_id = str(
                con.execute(
                    "SELECT value FROM keystore_meta WHERE name = 'keystore_id'"
                ).fetchone()[0]
            )
            sample = con.execute(
                "SELECT wrapped FROM record_keys WHERE destroyed_at IS NULL LIMIT 1"
            ).fetchone()
        if sample is not None:
            # Fail at start, not at the first image, when the KEK is not this keystore's.
            try:
                aes_key_unwrap(kek, sample[0])
            except InvalidUnwrap:
                raise WrongKEKError(
                    "the KEK does not unwrap this keystore's record keys (wrong DROPVAULT_KEK"
                    " or key file?)"
                ) from None

    def _has_table(self) -> bool:
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return False
        with closing(sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)) as con:
            try:
                row = con.execute(
                    "SELECT count(*) FROM sqlite_master"
                    " WHERE type = 'table' AND name = 'record_keys'"
                ).fetchone()
            except sqlite3.DatabaseError:
                return False
        return bool(row and row[0])

    @classmethod
    def create_local(cls, directory: Path) -> Keystore:
        """Make the embedded default's KEK file (0600) if it is not there, and open it.

        Only ``dropvault init`` (``dropvault.storage.home``) and tests call this."""
        directory = Path(directory)
        if not (directory / "kek.key").exists() and not (directory / "kek.key.new").exists():
            stored = stored_key_count(directory / cls.FILE)
            if stored:
                # A new KEK here would orphan every existing key: refuse, and make nothing.
                raise MissingKEKError(
                    f"the keystore holds {stored} record keys but {directory.name}/kek.key is"
                    " missing: restore the key file or set DROPVAULT_KEK"
                )
            with suppress(FileExistsError):  # another process made it first
                create_secret(directory / "kek.key")
        return cls.local(directory, create=True)

    @classmethod
    def local(cls, directory: Path, create: bool = False) -> Keystore:
        """The embedded default: the KEK in ``directory/kek.key`` (0600). Never makes one: a
        missing file raises :class:`MissingKEKError` (``dropvault init`` makes it).

        A rotation interrupted after its commit left the new KEK in ``kek.key.new``:
        it is promoted when the keystore's keys are already wrapped by it.
        """
        directory = Path(directory)
        store_file = directory / cls.FILE
        if (
            not (directory / "kek.key").exists()
            and not (directory / "kek.key.new").exists()
            and store_file.exists()
            and store_file.stat().st_size > 0
        ):
            with closing(sqlite3.connect(store_file)) as con:
                live = con.execute(
                    "SELECT count(*) FROM record_keys WHERE destroyed_at IS NULL"
                ).fetchone()[0]
            if live:
                # Making a fresh KEK here would orphan every existing key: refuse instead.
                raise MissingKEKError(
                    f"the keystore holds {live} record keys but {directory.name}/kek.key is"
                    " missing: restore the key file or set DROPVAULT_KEK"
                )
        _settle_pending(directory)
        try:
            kek = load_secret(directory / "kek.key")
        except FileNotFoundError:
            raise MissingKEKError(
                f"{directory.name}/kek.key is missing: restore the key file or set DROPVAULT_KEK"
            ) from None
        return cls(directory, kek, create=create, reload=lambda want: _key_file(directory, want))

    @property
    def kek_id(self) -> str:
        return kek_id(self._kek)

    @property
    def kek_check(self) -> str:
        """The KEK's check value (``check_value``), recorded by ``dropvault init``."""
        return check_value(self._kek)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        with closing(sqlite3.connect(self.path, timeout=60, isolation_level=None)) as con:
            con.execute("PRAGMA secure_delete=ON")
            con.execute("PRAGMA journal_mode=DELETE")
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    def create(self) -> tuple[str, bytes]:
        """A new record key: returns ``(key_id, key)``."""
        return self.create_many(1)[0]

    def create_many(self, count: int) -> list[tuple[str, bytes]]:
        """``count`` new record keys in one transaction."""
        if count == 0:
            return []
        now = datetime.now(UTC).isoformat()
        made = [
            ("rk_" + secrets.token_hex(12), secrets.token_bytes(KEY_BYTES)) for _ in range(count)
        ]
        with self._connect() as con:
            self._follow_rotation(con)
            con.executemany(
                "INSERT INTO record_keys (key_id, wrapped, kek_id, created_at) VALUES (?,?,?,?)",
                [(kid, aes_key_wrap(self._kek, key), self.kek_id, now) for kid, key in made],
            )
        self._cache.update(made)
        return made

    def unwrap(self, key_id: str) -> bytes:
        """The record key, or :class:`KeyDestroyedError` / :class:`UnknownKeyError`."""
        cached = self._cache.get(key_id)
        if cached is not None:
            return cached
        with self._connect() as con:
            self._follow_rotation(con)
            row = con.execute(
                "SELECT wrapped, destroyed_at FROM record_keys WHERE key_id = ?", (key_id,)
            ).fetchone()
        if row is None:
            raise UnknownKeyError(f"no record key {key_id}")
        wrapped, destroyed_at = row
        if destroyed_at is not None or wrapped is None:
            raise KeyDestroyedError(f"record key {key_id} was destroyed at {destroyed_at}")
        try:
            key = aes_key_unwrap(self._kek, wrapped)
        except InvalidUnwrap as exc:
            raise WrongKEKError("the KEK does not unwrap this keystore") from exc
        self._cache[key_id] = key
        return key

    def unwrap_many(self, key_ids: list[str]) -> dict[str, bytes]:
        """The live ones of these record keys, unwrapped, in one read."""
        wanted = set(key_ids) - set(self._cache)
        if wanted:
            with self._connect() as con:
                rows = self._live_rows(con)
            for key_id, wrapped in rows:
                if key_id in wanted:
                    try:
                        self._cache[key_id] = aes_key_unwrap(self._kek, wrapped)
                    except InvalidUnwrap as exc:
                        raise WrongKEKError("the KEK does not unwrap this keystore") from exc
        return {k: self._cache[k] for k in key_ids if k in self._cache}

    def live(self, key_ids: list[str]) -> set[str]:
        """Which of these keys still unwrap (one read; for proofs of destruction)."""
        wanted = set(key_ids)
        with self._connect() as con:
            rows = self._live_rows(con)  # (a stale KEK would call every key dead)
        alive = set()
        for key_id, wrapped in rows:
            if key_id not in wanted:
                continue
            try:
                aes_key_unwrap(self._kek, wrapped)
                alive.add(key_id)
            except InvalidUnwrap:
                continue
        return alive

    def wrapped_bytes(self, key_id: str) -> bytes | None:
        """The stored wrapped key (for proofs of destruction in tests and audits)."""
        with self._connect() as con:
            row = con.execute(
                "SELECT wrapped FROM record_keys WHERE key_id = ?", (key_id,)
            ).fetchone()
        return None if row is None else row[0]

    def destroy(self, key_ids: list[str]) -> int:
        """Crypto-shred: overwrite the wrapped keys (secure_delete zeroes the old cells)."""
        now = datetime.now(UTC).isoformat()
        with self._connect() as con:
            count = 0
            for key_id in key_ids:
                cur = con.execute(
                    "UPDATE record_keys SET wrapped = NULL, destroyed_at = ?"
                    " WHERE key_id = ? AND destroyed_at IS NULL",
                    (now, key_id),
                )
                count += cur.rowcount
                self._cache.pop(key_id, None)
        # VACUUM rewrites the file so no page keeps the old cell either.
        with closing(sqlite3.connect(self.path, isolation_level=None)) as con:
            con.execute("PRAGMA secure_delete=ON")
            con.execute("VACUUM")
        return count

    def _follow_rotation(self, con: sqlite3.Connection) -> None:
        """Inside a key transaction: if another process rotated the KEK since this one
        opened the keystore, load the new KEK (or refuse); the rotation cannot happen
        meanwhile (the transaction holds SQLite's write lock)."""
        row = con.execute("SELECT value FROM keystore_meta WHERE name = 'kek_id'").fetchone()
        if row is None or row[0] == self.kek_id:
            return
        new = self._reload(row[0]) if self._reload is not None else None
        if new is None or kek_id(new) != row[0]:
            raise KEKRotatedError(
                f"the KEK was rotated (now {row[0]}) after this process started; restart it"
                " with the new KEK"
            )
        self._kek = new

    def _live_rows(self, con: sqlite3.Connection) -> list[tuple[str, bytes]]:
        """Every live wrapped key, read after following any rotation."""
        self._follow_rotation(con)
        return con.execute(
            "SELECT key_id, wrapped FROM record_keys WHERE destroyed_at IS NULL"
        ).fetchall()

    def current_check(self) -> str | None:
        """The check value of the KEK the last rotation put in place (None: never rotated)."""
        with self._connect() as con:
            row = con.execute("SELECT value FROM keystore_meta WHERE name = 'kek_check'").fetchone()
        return None if row is None else str(row[0])

    def rotate(self, new_kek: bytes, prepare: Callable[[], None] | None = None) -> int:
        """Re-wrap every live record key under ``new_kek``. Returns how many were re-wrapped.

        All in one transaction, with the record of the new KEK: a failure leaves every
        key under the old KEK; a process still holding the old one notices at its next key
        operation (:meth:`_follow_rotation`). The caller stores ``new_kek`` first
        (see :meth:`rotate_local`).
        """
        if len(new_kek) != KEY_BYTES:
            raise ValueError("the new KEK must be 32 bytes (AES-256)")
        new_id = kek_id(new_kek)
        with self._connect() as con:
            rows = self._live_rows(con)
            if prepare is not None:
                prepare()  # under the write lock (rotate_local writes kek.key.new here)
            for key_id, wrapped in rows:
                try:
                    key = aes_key_unwrap(self._kek, wrapped)
                except InvalidUnwrap as exc:
                    raise WrongKEKError("the current KEK does not unwrap this keystore") from exc
                con.execute(
                    "UPDATE record_keys SET wrapped = ?, kek_id = ? WHERE key_id = ?",
                    (aes_key_wrap(new_kek, key), new_id, key_id),
                )
            con.executemany(
                "INSERT OR REPLACE INTO keystore_meta VALUES (?, ?)",
                [("kek_id", new_id), ("kek_check", check_value(new_kek))],
            )
            _fault("before_commit")
        self._kek = new_kek
        self._cache.clear()
        return len(rows)

    def rotate_local(self) -> int:
        """Rotate the embedded default's key file: the new KEK is written to
        ``kek.key.new`` (0600), the keys are re-wrapped (one transaction), then the file
        replaces ``kek.key``. Killed at any step, the next open finishes or undoes it
        (:meth:`local`), and no key is ever under a KEK that no file holds."""
        pending = self.directory / "kek.key.new"
        if pending.exists():
            # An earlier rotation stopped: finish it (its commit happened) or drop it.
            self._kek = Keystore.local(self.directory)._kek
        new_kek = secrets.token_bytes(KEY_BYTES)

        def write_new() -> None:
            # Inside the re-wrap's transaction: a start settling a leftover kek.key.new
            # (_settle_pending) takes the same lock, so it never sees this file before its
            # keys are committed, and never removes it.
            write_secret_file(pending, new_kek)
            _fault("after_new_file")

        count = self.rotate(new_kek, prepare=write_new)
        _fault("after_commit")
        try:
            pending.replace(self.directory / "kek.key")
        except FileNotFoundError:
            # A start promoted it first (it was committed): kek.key holds it already.
            if _key_file(self.directory, kek_id(new_kek)) is None:
                raise
        return count
