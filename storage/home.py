"""A dropvault home: every location and store one deployment uses, as objects.

``flows/settings.py`` builds one from the environment; a notebook or a test
builds one from its own locations (``Home.local(path)`` for a folder), so any
task can run against any home without touching the environment.

A home is made once, on purpose (``dropvault init``, :meth:`Home.init`): its
folders, its KEK and pepper, and a record (``dropvault-home.json``) of where each
key comes from and a check value of each (``dropvault.storage.keystore.check_value``, never
the key). Opening a home needs that record and keys that match it: a missing or
different key stops the caller, and nothing outside ``init`` ever makes a key.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import duckdb

from dropvault.storage.catalog import Catalog
from dropvault.storage.errors import TerminalError
from dropvault.storage.keystore import (
    KeyFileError,
    Keystore,
    MissingKEKError,
    check_value,
    create_secret,
    load_secret,
    private_dir,
    stored_key_count,
    write_secret_file,
)
from dropvault.storage.locations import Location
from dropvault.storage.vault import Vault

LOCATIONS = (
    "drops",
    "vault",
    "quarantine",
    "archive",
    "manifests",
    "beacons",
    "exports",
    "outbox",
)
KeyName = Literal["kek", "pepper"]


class NotAHomeError(TerminalError, RuntimeError):
    """The folder was never made a dropvault home (``dropvault init``)."""


class KeyCheckError(TerminalError, RuntimeError):
    """A key is missing or is not the one the home was made with. ``which`` is
    ``kek`` or ``pepper``; the message names no key material."""

    def __init__(self, which: KeyName, message: str) -> None:
        super().__init__(message)
        self.which = which


@dataclass(frozen=True)
class HomeRecord:
    """What ``init`` recorded: where each key comes from and its check value."""

    kek_source: str  # file | env | kms
    pepper_source: str  # file | env
    kek_check: str
    pepper_check: str
    created_at: str
    format: int = 1
    keystore_id: str = ""  # the keystore's own id (``keystore_meta``): another is refused

    FILE = "dropvault-home.json"

    @classmethod
    def read(cls, root: Path) -> HomeRecord | None:
        path = Path(root) / cls.FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise NotAHomeError(f"{path} cannot be read ({type(exc).__name__})") from None
        try:
            return cls(**data)
        except TypeError:
            raise NotAHomeError(f"{path} is not a dropvault home record") from None

    def write(self, root: Path) -> None:
        """Create the record whole (never replaces one; ``FileExistsError`` if it exists)."""
        data = json.dumps(asdict(self), indent=2).encode()
        write_secret_file(Path(root) / self.FILE, data)

    def verify_keystore(self, keystore: Keystore) -> None:
        if self.keystore_id and keystore.keystore_id != self.keystore_id:
            raise KeyCheckError(
                "kek",
                "keys/keystore.sqlite is not the keystore this home was made with; restore it",
            )

    def verify_kek(self, keystore: Keystore, given_as: str) -> None:
        """The keystore's KEK is the one this home was made with, or the one a rotation
        put in place since (the keystore records it in the rotation's own transaction)."""
        if keystore.kek_check not in (self.kek_check, keystore.current_check()):
            raise KeyCheckError(
                "kek",
                f"{given_as} is not the KEK this home was made with (or rotated to);"
                " restore the right key",
            )

    def verify(self, which: KeyName, key: bytes, given_as: str) -> None:
        """Raise :class:`KeyCheckError` unless ``key`` is the one this home was made with."""
        if check_value(key) != getattr(self, f"{which}_check"):
            raise KeyCheckError(
                which,
                f"{given_as} is not the {which.upper()} this home was made with"
                " (its check value differs); restore the right key",
            )


def require_record(root: Path) -> HomeRecord:
    """The home's record, or :class:`NotAHomeError` (nothing is created either way)."""
    record = HomeRecord.read(root)
    if record is None:
        raise NotAHomeError(f"{root} is not a dropvault home: run dropvault init")
    return record


def new_record(
    pepper: bytes, kek_source: str, pepper_source: str, keystore: Keystore
) -> HomeRecord:
    """A record for a new home: check values of its keys, and its keystore's id."""
    return HomeRecord(
        kek_source=kek_source,
        pepper_source=pepper_source,
        kek_check=keystore.kek_check,
        pepper_check=check_value(pepper),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        keystore_id=keystore.keystore_id,
    )


def local_pepper(keys: Path, record: HomeRecord | None) -> bytes:
    """The pepper file under ``keys``; a missing one is an error, never replaced."""
    try:
        return load_secret(keys / "pepper.key")
    except FileNotFoundError:
        where = (
            " (this home's pepper was given as a setting)"
            if record and (record.pepper_source == "env")
            else ""
        )
        raise KeyCheckError("pepper", f"{keys.name}/pepper.key is missing{where}") from None
    except KeyFileError as exc:
        raise KeyCheckError("pepper", str(exc)) from None


def catalog_holds_data(catalog: Catalog) -> bool:
    """Whether the catalog already knows a study or a deletion (so a new pepper would give
    its patients new pseudonyms and let deleted studies come back)."""
    if catalog.lake is None and not catalog.path.exists():
        return False
    if catalog.lake is not None:
        catalog.migrate()  # a reader cannot attach a lake that was never made
    for table in ("studies", "instances", "objects", "tombstones", "quarantine"):
        try:
            if catalog.query(f"SELECT count(*) AS n FROM {table}")["n"][0]:  # noqa: S608
                return True
        except duckdb.CatalogException:
            continue  # an older catalog, migrated only part way: this table is not there yet
    return False


def init_keys(
    keys: Path,
    catalog: Catalog,
    *,
    kek: bytes | None = None,
    kek_source: str = "file",
    new_kek: Callable[[], bytes] | None = None,
    pepper: bytes | None = None,
) -> tuple[Keystore, bytes, HomeRecord]:
    """Make (or adopt) a home's keys and the record of their check values; never replaces
    a key, and refuses to make one where data sealed or keyed by the old one exists.

    ``kek``: given (environment or KMS-opened); else ``new_kek()`` makes one (KMS); else the
    key file ``keys/kek.key`` is adopted or made. ``pepper``: given, else ``keys/pepper.key``
    is adopted or made.
    """
    private_dir(keys)
    stored = stored_key_count(keys / Keystore.FILE)
    holds = bool(stored) or catalog_holds_data(catalog)
    makes_kek = (kek is None and new_kek is not None) or (
        kek is None and not (keys / "kek.key").exists() and not (keys / "kek.key.new").exists()
    )
    makes_pepper = pepper is None and not (
        (keys / "pepper.key").exists() or (keys / "pepper.key").is_symlink()
    )
    # Everything is checked before anything is made: a refusal leaves no new key behind.
    if makes_kek and holds:
        raise KeyCheckError(
            "kek",
            f"the KEK is missing and this home already holds data ({stored} record keys):"
            " restore it (a new one would strand every record key)",
        )
    if makes_pepper and holds:
        raise KeyCheckError(
            "pepper",
            f"{keys.name}/pepper.key is missing and this home already holds data:"
            " restore the pepper (a new one would give every patient a new pseudonym)",
        )
    if kek is None and new_kek is not None:
        kek = new_kek()
    try:
        keystore = (
            Keystore(keys, kek, create=True) if kek is not None else Keystore.create_local(keys)
        )
    except MissingKEKError as exc:
        raise KeyCheckError("kek", str(exc)) from None
    pepper_source = "file" if pepper is None else "env"
    if pepper is None:
        if makes_pepper:
            with suppress(FileExistsError):  # another process made it first
                create_secret(keys / "pepper.key")
        pepper = local_pepper(keys, None)  # adopted, or refused; never replaced
    return keystore, pepper, new_record(pepper, kek_source, pepper_source, keystore)


@dataclass
class Home:
    drops: Location
    vault: Location
    quarantine: Location
    archive: Location
    manifests: Location
    beacons: Location
    exports: Location
    outbox: Location  # packages delivered to grantees, age-encrypted to each
    catalog: Catalog
    keystore: Keystore
    pepper: bytes = field(repr=False)  # HMAC key for patient_key and other pseudonyms
    region: str = "local"

    @classmethod
    def init(cls, root: Path | str) -> Home:
        """Make the embedded default home below one folder (folders, 0600 key files, the
        record), or open it if it was made already. Key files already there are adopted
        (a home made before records existed), never replaced."""
        root = Path(root).resolve()
        if HomeRecord.read(root) is None:
            _, _, record = init_keys(root / "keys", Catalog(root / "catalog.duckdb"))
            for name in LOCATIONS:
                (root / name).mkdir(parents=True, exist_ok=True)
            with suppress(FileExistsError):  # made by another process at once: local() checks
                record.write(root)
        return cls.local(root)

    @classmethod
    def local(cls, root: Path | str) -> Home:
        """Open the embedded default home below one folder, made before by :meth:`init`.

        Raises :class:`NotAHomeError` for a folder that is not a home, and
        :class:`KeyCheckError` for a missing or different key; creates nothing then."""
        root = Path(root).resolve()
        record = require_record(root)
        keys = root / "keys"
        try:
            keystore = Keystore.local(keys)
        except (MissingKEKError, KeyFileError) as exc:
            raise KeyCheckError("kek", str(exc)) from None
        record.verify_kek(keystore, "keys/kek.key")
        record.verify_keystore(keystore)
        pepper = local_pepper(keys, record)
        record.verify("pepper", pepper, "keys/pepper.key")
        locations = {}
        for name in LOCATIONS:
            (root / name).mkdir(parents=True, exist_ok=True)
            locations[name] = Location((root / name).as_uri())
        return cls(
            **locations,  # type: ignore[arg-type]
            catalog=Catalog(root / "catalog.duckdb"),
            keystore=keystore,
            pepper=pepper,
        )

    def location_for(self, url: str) -> Location:
        """The home's location with this URL (vault, quarantine or archive, with their
        credentials), or a plain one for a URL the home no longer uses."""
        for location in (self.vault, self.quarantine, self.archive):
            if location.url == url:
                return location
        return Location(url)

    def store_for(self, url: str) -> Vault:
        """The encrypted store at this URL (see :meth:`location_for`)."""
        return Vault(self.location_for(url), self.keystore)

    def vault_store(self) -> Vault:
        return Vault(self.vault, self.keystore)

    def quarantine_store(self) -> Vault:
        return Vault(self.quarantine, self.keystore)

    def archive_store(self) -> Vault:
        return Vault(self.archive, self.keystore)

    def ensure(self) -> None:
        for name in LOCATIONS:
            getattr(self, name).ensure()
