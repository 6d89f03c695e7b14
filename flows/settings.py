"""The one place that reads the environment (prefix ``DROPVAULT_``).

Every location derives from ``DROPVAULT_HOME`` (default ``./.dropvault``)
unless its own ``DROPVAULT_<NAME>_URL`` is set. S3 uses the usual AWS
variables, or ``DROPVAULT_S3_ENDPOINT_URL`` and friends.

Keys are made once, by ``dropvault init`` (:meth:`Settings.init_home`), which
records a check value of each in the home. The KEK comes from, in this order:
AWS KMS (``DROPVAULT_KEK_KMS_KEY_ID``: only a ciphertext blob is kept, in
``{keys}/kek.kms``), ``DROPVAULT_KEK`` (base64 of 32 bytes), or the 0600 file
``{keys}/kek.key``; the pepper from ``DROPVAULT_PEPPER`` or ``{keys}/pepper.key``.
Every other start (:meth:`Settings.build_home`) refuses a folder that is not a
home and a key that is missing or differs from the record, and makes no key.

A bad value fails at start with a message that names the setting.
"""

from __future__ import annotations

import base64
import binascii
import configparser
import functools
import os
import re
from contextlib import AbstractContextManager, nullcontext, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema
from pydantic_settings import BaseSettings, SettingsConfigDict

from dropvault.flows.limits import catalog_write_slot
from dropvault.storage import kms
from dropvault.storage.catalog import Catalog
from dropvault.storage.ducklake import EXTENSIONS, Lake, LakeSetupError, extension_path
from dropvault.storage.errors import TerminalError
from dropvault.storage.home import (
    LOCATIONS,
    Home,
    HomeRecord,
    KeyCheckError,
    NotAHomeError,
    init_keys,
    local_pepper,
    require_record,
)
from dropvault.storage.keystore import KeyError_, KeyFileError, Keystore, MissingKeystoreError
from dropvault.storage.locations import InsecureEndpointError, Location, check_endpoint_tls

if TYPE_CHECKING:
    from dropvault.tasks.archives import ArchiveLimits

SCHEMES = {"file", "memory", "s3", "s3a"}
DUCKLAKE_PREFIX = "ducklake:postgres:"


class SettingsError(TerminalError, ValueError):
    """A setting is wrong; the message names it."""


# Endpoint variables botocore honours on its own (besides the profile's endpoint_url).
AWS_ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_KMS")


def _prefect_server() -> bool:
    """Whether flows report to a Prefect server that outlives them (``PREFECT_API_URL``,
    not the command's own server). Without one, each CLI run has a server of its own,
    which keeps concurrency leases in memory and dies with the run: a run killed -9 would
    hold the catalog-write slot for good in the home's Prefect database, so those runs
    rely on DuckDB's own file lock (released when a process dies) instead."""
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value()) and not _on_command_server


def _write_guard(timeout_seconds: float) -> AbstractContextManager[object]:
    """The catalog's write guard, decided at each write rather than when the home is built:
    that needs Prefect's settings (~1 s to import), which a command that writes nothing
    should not pay."""
    if _prefect_server():
        return catalog_write_slot(timeout_seconds)
    return nullcontext()


def _profile_endpoints() -> list[tuple[str, str]]:
    """``(where, endpoint)`` of every ``endpoint_url`` the active AWS profile sets in the
    shared config file (botocore uses them as it does AWS_ENDPOINT_URL): at the profile's
    level, under its ``s3``/``kms`` keys, or in the ``services`` section it names."""
    if (os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS") or "").lower() == "true":
        return []
    path = Path(os.environ.get("AWS_CONFIG_FILE") or Path.home() / ".aws" / "config")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, configparser.Error):
        return []  # none, or not one botocore could read either
    profile = os.environ.get("AWS_PROFILE") or "default"
    sections = [s for s in (profile, f"profile {profile}") if parser.has_section(s)]
    for section in list(sections):
        service = parser.get(section, "services", fallback="")
        if service and parser.has_section(f"services {service}"):
            sections.append(f"services {service}")
    found = []
    for section in sections:
        for key, value in parser.items(section):
            text = f"{key} = {value}" if key == "endpoint_url" else value
            for line in text.splitlines():
                name, _, url = line.partition("=")
                if name.strip() == "endpoint_url" and url.strip():
                    found.append((f"{path.name} [{section}] {key}", url.strip()))
    return found


def _check_url(value: str | None, name: str) -> str | None:
    if value is None:
        return None
    scheme = urlsplit(value).scheme
    if scheme not in SCHEMES:
        raise ValueError(f"{name} must be a file://, memory:// or s3:// URL")
    return value.rstrip("/")


def _decode_key(value: SecretStr | None, name: str) -> bytes | None:
    if value is None:
        return None
    try:
        raw = base64.b64decode(value.get_secret_value(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SettingsError(f"{name} must be base64") from exc
    if len(raw) != 32:
        raise SettingsError(f"{name} must decode to 32 bytes")
    return raw


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DROPVAULT_", extra="ignore")

    home: Path = Path(".dropvault")
    drops_url: str | None = None
    vault_url: str | None = None
    quarantine_url: str | None = None
    archive_url: str | None = None
    manifests_url: str | None = None
    beacons_url: str | None = None
    exports_url: str | None = None
    outbox_url: str | None = None
    # A local DuckDB file path or file:// URL, or ducklake:postgres:<libpq conninfo>
    catalog_url: str | None = None
    catalog_data_url: str | None = None  # DuckLake's Parquet files: s3://bucket/prefix/
    catalog_schema: str | None = None  # DuckLake's metadata schema in PostgreSQL
    # DuckLake only: ducklake:postgres:<conninfo> of a SELECT-only role for readers.
    catalog_reader_url: str | None = None
    keys_dir: Path | None = None

    quiet_seconds: float = Field(default=120.0, ge=0)
    incomplete_seconds: float = Field(default=86400.0, gt=0)
    # At most 45 GiB: an S3 upload has at most 10,000 parts of OBJECT_STORE_BLOCK (5 MiB).
    max_file_bytes: int = Field(default=4 * 1024**3, gt=0, le=45 * 1024**3)
    batch_files: int = Field(default=500, gt=0)
    batch_bytes: int = Field(default=256 * 1024**2, gt=0)
    # Ingest batches one flow runs at once (threads): one parses while another writes.
    batches_in_flight: int = Field(default=2, ge=1, le=16)
    orphan_grace_seconds: float = Field(default=3600.0, ge=0)
    lock_timeout_seconds: float = Field(default=120.0, gt=0)
    # DuckDB memory limit of each read-only catalog connection (analysts' queries; no spill).
    reader_memory_limit: str = "4GB"
    # A read-only query is stopped after this; below the writers' lock timeout, so a long
    # notebook query cannot make a flow's commit give up.
    reader_timeout_seconds: float = Field(default=60.0, gt=0)
    region: str = "local"
    deletion_at_risk_hours: float = Field(default=6.0, gt=0)
    sweep_batch: int = Field(default=500, gt=0)
    # Quarantined files are shredded after this many days (0 keeps them): a damaged copy
    # that names no study cannot go with its study's deletion, so none is kept for ever.
    quarantine_retention_days: int = Field(default=90, ge=0)
    # Archives in drops (tasks/archives.py): past a bound, one is quarantined whole.
    archive_max_bytes: int = Field(default=16 * 1024**3, gt=0)  # unpacked, per archive
    archive_max_members: int = Field(default=100_000, gt=0)
    archive_max_ratio: float = Field(default=200.0, ge=1)  # unpacked bytes per archive byte
    archive_max_depth: int = Field(default=1, ge=0)  # archives inside archives
    # A CD's files that are not images (viewer, autorun.inf, README, a PDF report): kept
    # encrypted in quarantine (cd_extra) or counted, named in the receipt, and removed.
    cd_extras: Literal["keep", "discard"] = "keep"
    # A delivered package stays in the outbox this long, then the next run removes it.
    delivery_ttl_hours: float = Field(default=168.0, gt=0, le=24 * 366 * 10)  # 10 years at most
    beacon_retention: Literal["delete", "keep"] = "delete"
    beacon_memory_limit: str = "1GB"
    # A beacon log larger than this once decompressed is set aside unread (too_large).
    beacon_max_log_bytes: int = Field(default=1 << 30, gt=0)
    # The disclosure audit's time per day or period; past it, everything the audit decides
    # is hidden (a table built to make the audit slow publishes nothing it could pin).
    beacon_audit_seconds: float = Field(default=120.0, gt=0)

    kek: SecretStr | None = None
    # Only for `dropvault rotate-kek` on a home whose KEK is given as DROPVAULT_KEK.
    new_kek: SecretStr | None = None
    pepper: SecretStr | None = None
    # AWS KMS key (id, ARN or alias) that seals the KEK; KMS's endpoint and region if not AWS's.
    kek_kms_key_id: str | None = None
    kms_endpoint_url: str | None = None
    kms_region: str | None = None

    s3_endpoint_url: str | None = None
    s3_key: SecretStr | None = None
    s3_secret: SecretStr | None = None
    s3_region: str | None = None

    @field_validator(
        "drops_url",
        "vault_url",
        "quarantine_url",
        "archive_url",
        "manifests_url",
        "beacons_url",
        "exports_url",
        "outbox_url",
    )
    @classmethod
    def _url(cls, value: str | None, info: Any) -> str | None:
        return _check_url(value, f"DROPVAULT_{info.field_name.upper()}")

    @field_validator("catalog_url", "catalog_reader_url")
    @classmethod
    def _no_password(cls, value: str | None, info: Any) -> str | None:
        # A password in the conninfo would be shown by duckdb_databases() and stored with
        # every flow run's parameters: libpq reads PGPASSWORD or ~/.pgpass instead.
        if value is not None and (
            re.search(r"password\s*=", value, re.IGNORECASE)
            or re.search(r"://[^/@\s]*:[^/@\s]*@", value)  # postgresql://user:secret@host
        ):
            raise ValueError(
                f"DROPVAULT_{info.field_name.upper()} must not hold a password:"
                " use PGPASSWORD or a .pgpass file"
            )
        return value

    @field_validator("catalog_url")
    @classmethod
    def _catalog_url(cls, value: str | None) -> str | None:
        if value is None or value.startswith(DUCKLAKE_PREFIX):
            return value
        if urlsplit(value).scheme not in ("", "file"):
            raise ValueError(
                "DROPVAULT_CATALOG_URL must be a DuckDB file path, a file:// URL"
                f" or {DUCKLAKE_PREFIX}<conninfo>"
            )
        return value

    @field_validator("catalog_reader_url")
    @classmethod
    def _catalog_reader_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(DUCKLAKE_PREFIX):
            raise ValueError(f"DROPVAULT_CATALOG_READER_URL must be {DUCKLAKE_PREFIX}<conninfo>")
        return value

    @field_validator("catalog_data_url")
    @classmethod
    def _catalog_data_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("file", "s3", "s3a"):
            raise ValueError("DROPVAULT_CATALOG_DATA_URL must be an s3:// or file:// URL")
        return value

    @field_validator("home", mode="before")
    @classmethod
    def _home(cls, value: Any) -> Any:
        # Path("") is the current folder: an empty setting must not make it the home.
        if isinstance(value, str) and not value.strip():
            raise ValueError("DROPVAULT_HOME is empty: name the home folder")
        try:
            str(value).encode("utf-8")
        except UnicodeEncodeError:
            # DuckDB, URIs and JSON need a UTF-8 path: refuse before anything is made.
            raise ValueError("DROPVAULT_HOME is not valid UTF-8") from None
        return value

    @field_validator("s3_endpoint_url", "kms_endpoint_url")
    @classmethod
    def _tls(cls, value: str | None, info: Any) -> str | None:
        try:
            check_endpoint_tls(value)
        except InsecureEndpointError as exc:
            raise ValueError(f"DROPVAULT_{info.field_name.upper()}: {exc}") from exc
        return value

    @model_validator(mode="after")
    def _keys(self) -> Settings:
        # botocore reads these itself: the same TLS rule as DROPVAULT_S3_ENDPOINT_URL.
        endpoints = [(name, os.environ.get(name) or None) for name in AWS_ENDPOINT_VARIABLES]
        for name, value in endpoints + _profile_endpoints():
            try:
                check_endpoint_tls(value)
            except InsecureEndpointError as exc:
                raise SettingsError(f"{name}: {exc}") from exc
        _decode_key(self.kek, "DROPVAULT_KEK")
        _decode_key(self.pepper, "DROPVAULT_PEPPER")
        if self.kek is not None and self.kek_kms_key_id:
            raise SettingsError(
                "set DROPVAULT_KEK or DROPVAULT_KEK_KMS_KEY_ID, not both (the KMS key seals the"
                " KEK; a plain KEK beside it would defeat that)"
            )
        lake = bool(self.catalog_url and self.catalog_url.startswith(DUCKLAKE_PREFIX))
        if lake and not self.catalog_data_url:
            raise SettingsError(
                "DROPVAULT_CATALOG_DATA_URL must be set (s3://...) for a DuckLake catalog"
            )
        if self.catalog_data_url and not lake:
            raise SettingsError(
                "DROPVAULT_CATALOG_DATA_URL is only for DROPVAULT_CATALOG_URL=ducklake:postgres:..."
            )
        return self

    @classmethod
    def load(cls, **overrides: Any) -> Settings:
        """Read the environment; raise :class:`SettingsError` naming the bad setting."""
        try:
            return cls(**overrides)
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                field = ".".join(str(p) for p in err["loc"]) or "settings"
                name = f"DROPVAULT_{field.upper()}" if field != "settings" else field
                message = err["msg"].removeprefix("Value error, ")
                if message.startswith("DROPVAULT_"):
                    problems.append(message)
                else:
                    problems.append(f"{name}: {message}")
            raise SettingsError("invalid setting: " + "; ".join(problems)) from None
        except SettingsError as exc:
            raise SettingsError(f"invalid setting: {exc}") from None

    # -- building the home -------------------------------------------------

    def storage_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.s3_endpoint_url:
            options["endpoint_url"] = self.s3_endpoint_url
        if self.s3_key:
            options["key"] = self.s3_key.get_secret_value()
        if self.s3_secret:
            options["secret"] = self.s3_secret.get_secret_value()
        if self.s3_region:
            options["client_kwargs"] = {"region_name": self.s3_region}
        return options

    def location_url(self, name: str) -> str:
        url: str | None = getattr(self, f"{name}_url")
        return url or (self.home.resolve() / name).as_uri()

    def catalog_target(self) -> Path | Lake:
        """The DuckDB file, or the DuckLake (checked to be loadable offline)."""
        if self.catalog_url and self.catalog_url.startswith(DUCKLAKE_PREFIX):
            assert self.catalog_data_url is not None  # noqa: S101 - checked by _keys
            try:
                for package, name in EXTENSIONS.items():
                    extension_path(package, name)
            except LakeSetupError as exc:
                raise SettingsError(f"invalid setting: DROPVAULT_CATALOG_URL: {exc}") from None
            data = self.catalog_data_url
            return Lake(
                metadata=self.catalog_url.removeprefix(DUCKLAKE_PREFIX),
                data_url=data,
                s3=self.storage_options() if urlsplit(data).scheme.startswith("s3") else {},
                schema=self.catalog_schema,
                reader_metadata=(
                    self.catalog_reader_url.removeprefix(DUCKLAKE_PREFIX)
                    if self.catalog_reader_url
                    else None
                ),
            )
        return self.catalog_path()

    def catalog_path(self) -> Path:
        if self.catalog_url is None:
            return self.home.resolve() / "catalog.duckdb"
        parts = urlsplit(self.catalog_url)
        if parts.scheme in ("", "file"):
            return Path(parts.path if parts.scheme else self.catalog_url)
        raise SettingsError(
            "invalid setting: DROPVAULT_CATALOG_URL names a DuckLake, not a DuckDB file"
        )

    # -- the home and its keys ----------------------------------------------

    @property
    def keys_path(self) -> Path:
        # Not resolved: a keys folder that is a symlink must be seen, and refused.
        return (self.keys_dir or self.home.resolve() / "keys").absolute()

    def check_home(self) -> HomeRecord:
        """The home's record; a folder never made a home stops here, and nothing is created."""
        try:
            return require_record(self.home.resolve())
        except NotAHomeError as exc:
            raise SettingsError(
                f"invalid setting: DROPVAULT_HOME={self.home.resolve()} is not a dropvault home"
                + (": run dropvault init" if "run dropvault init" in str(exc) else f" ({exc})")
            ) from None

    def kms_client(self) -> Any:
        """A boto3 KMS client for ``DROPVAULT_KEK_KMS_KEY_ID`` (credentials: the AWS chain)."""
        import boto3

        region = self.kms_region or self.s3_region
        return boto3.client("kms", endpoint_url=self.kms_endpoint_url, region_name=region)

    def _kek(self, record: HomeRecord | None) -> tuple[bytes | None, str]:
        """``(kek, source)``; ``kek`` is None for the key file, which the keystore opens."""
        if self.kek_kms_key_id:
            try:
                return kms.open_kek(self.kms_client(), self.kek_kms_key_id, self.keys_path), "kms"
            except kms.KmsKekError as exc:
                raise SettingsError(f"invalid setting: DROPVAULT_KEK_KMS_KEY_ID: {exc}") from None
        kek = _decode_key(self.kek, "DROPVAULT_KEK")
        if kek is not None:
            return kek, "env"
        if record is not None and record.kek_source in ("env", "kms"):
            name = "DROPVAULT_KEK" if record.kek_source == "env" else "DROPVAULT_KEK_KMS_KEY_ID"
            raise SettingsError(
                f"invalid setting: {name} is not set, and this home's KEK was given that way"
            )
        return None, "file"

    @property
    def _kek_setting(self) -> str:
        return "DROPVAULT_KEK_KMS_KEY_ID" if self.kek_kms_key_id else "DROPVAULT_KEK"

    def rotate_kek(self) -> str:
        """``dropvault rotate-kek``: re-wrap every record key under a new KEK, atomically
        (see ``Keystore.rotate``). A key-file home gets a new ``keys/kek.key``; a home
        whose KEK is a setting takes the new one from DROPVAULT_NEW_KEK."""
        if self.kek_kms_key_id:
            raise SettingsError(
                "invalid setting: DROPVAULT_KEK_KMS_KEY_ID: a KMS-sealed KEK is rotated with"
                " KMS (dropvault rotate-kms-key, or the KMS key's automatic rotation)"
            )
        keystore, _ = self.check_keys()
        if self.kek is None:
            count = keystore.rotate_local()
            return f"{count} record keys re-wrapped under a new KEK in keys/kek.key"
        new = _decode_key(self.new_kek, "DROPVAULT_NEW_KEK")
        if new is None:
            raise SettingsError(
                "invalid setting: DROPVAULT_NEW_KEK is not set (the KEK is given as"
                " DROPVAULT_KEK, so the new one must be given too)"
            )
        if new == _decode_key(self.kek, "DROPVAULT_KEK"):
            raise SettingsError("invalid setting: DROPVAULT_NEW_KEK is the current KEK")
        count = keystore.rotate(new)
        return (
            f"{count} record keys re-wrapped: set DROPVAULT_KEK to the new KEK now (runs"
            " still holding the old one stop at their next key use)"
        )

    def _pepper(self, record: HomeRecord) -> tuple[bytes, str]:
        """``(pepper, where it came from)``."""
        pepper = _decode_key(self.pepper, "DROPVAULT_PEPPER")
        if pepper is not None:
            return pepper, "DROPVAULT_PEPPER"
        if record.pepper_source == "env":
            raise SettingsError(
                "invalid setting: DROPVAULT_PEPPER is not set, and this home's pepper was given"
                " that way"
            )
        try:
            return local_pepper(self.keys_path, record), "keys/pepper.key"
        except KeyCheckError as exc:
            raise SettingsError(f"invalid setting: DROPVAULT_PEPPER: {exc}") from None

    def _keystore(self, record: HomeRecord) -> Keystore:
        kek, _ = self._kek(record)
        name = self._kek_setting
        try:
            if kek is not None:
                keystore = Keystore(self.keys_path, kek)
                record.verify_kek(keystore, name)
                return self._same_keystore(record, keystore)
            keystore = Keystore.local(self.keys_path)
            record.verify_kek(keystore, "keys/kek.key")
        except KeyCheckError as exc:
            raise SettingsError(f"invalid setting: {exc}") from None
        except MissingKeystoreError as exc:
            raise SettingsError(f"invalid setting: DROPVAULT_KEYS_DIR: {exc}") from None
        except (KeyError_, KeyFileError) as exc:
            raise SettingsError(f"invalid setting: {name}: {exc}") from None
        return self._same_keystore(record, keystore)

    @staticmethod
    def _same_keystore(record: HomeRecord, keystore: Keystore) -> Keystore:
        try:
            record.verify_keystore(keystore)
        except KeyCheckError as exc:
            raise SettingsError(f"invalid setting: DROPVAULT_KEYS_DIR: {exc}") from None
        return keystore

    def check_keys(self) -> tuple[Keystore, bytes]:
        """Open the keystore and the pepper, each checked against the home's record."""
        record = self.check_home()
        keystore = self._keystore(record)
        pepper, given_as = self._pepper(record)
        try:
            record.verify("pepper", pepper, given_as)
        except KeyCheckError as exc:
            raise SettingsError(f"invalid setting: DROPVAULT_PEPPER: {exc}") from None
        return keystore, pepper

    def init_home(self) -> tuple[Home, str]:
        """``dropvault init``: make the home (folders, keys, record), or check a made one.

        Keys given as settings are recorded, never copied to disk; key files already in
        the keys folder are adopted, never replaced; no key is made where data sealed or
        keyed by an earlier one exists (``dropvault.storage.home.init_keys``). Returns the home and
        what was done.
        """
        root = self.home.resolve()
        if HomeRecord.read(root) is not None:
            home = self.build_home()
            return home, f"{root} is already a dropvault home; its keys check"
        root.mkdir(parents=True, exist_ok=True)
        kek, kek_source = None, "file"
        new_kek = None
        if self.kek_kms_key_id:
            kek_source = "kms"
            if kms.blob_path(self.keys_path).exists():
                kek, _ = self._kek(None)
            else:
                client, key_id = self.kms_client(), self.kek_kms_key_id

                def new_kek() -> bytes:
                    return kms.create_kek(client, key_id, self.keys_path)
        else:
            kek, kek_source = self._kek(None)
        try:
            keystore, _, record = init_keys(
                self.keys_path,
                self._catalog(),
                kek=kek,
                kek_source=kek_source,
                new_kek=new_kek,
                pepper=_decode_key(self.pepper, "DROPVAULT_PEPPER"),
            )
        except KeyCheckError as exc:
            name = self._kek_setting if exc.which == "kek" else "DROPVAULT_PEPPER"
            raise SettingsError(f"invalid setting: {name}: {exc}") from None
        except kms.KmsKekError as exc:
            raise SettingsError(f"invalid setting: DROPVAULT_KEK_KMS_KEY_ID: {exc}") from None
        except (KeyError_, KeyFileError) as exc:
            raise SettingsError(f"invalid setting: {self._kek_setting}: {exc}") from None
        with suppress(FileExistsError):  # made by another process at once: checked below
            record.write(root)
        home = self.build_home()
        home.catalog.migrate()  # so a new home's status and queries work at once
        return home, (
            f"made dropvault home {root}: KEK from {kek_source}, pepper from"
            f" {record.pepper_source}; check values recorded in {HomeRecord.FILE}"
        )

    def _catalog(self) -> Catalog:
        return Catalog(
            self.catalog_target(),
            lock_timeout=self.lock_timeout_seconds,
            write_guard=functools.partial(_write_guard, self.lock_timeout_seconds),
            reader_memory_limit=self.reader_memory_limit,
            reader_timeout=self.reader_timeout_seconds,
        )

    def archive_limits(self) -> ArchiveLimits:
        """The ``DROPVAULT_ARCHIVE_*`` bounds on one archive in a drop."""
        # Imported here: the CLI sets Prefect's home before Prefect is first imported.
        from dropvault.tasks.archives import ArchiveLimits

        return ArchiveLimits(
            max_bytes=self.archive_max_bytes,
            max_members=self.archive_max_members,
            max_ratio=self.archive_max_ratio,
            max_depth=self.archive_max_depth,
            max_file_bytes=self.max_file_bytes,
        )

    def build_home(self) -> Home:
        """Every location and store of a home made by ``init``, its keys checked.

        Refuses (``SettingsError``, naming the setting) before creating anything when the
        home was never made or a key is missing or different."""
        keystore, pepper = self.check_keys()
        locations: dict[str, Location] = {}
        for name in LOCATIONS:
            url = self.location_url(name)
            options = self.storage_options() if urlsplit(url).scheme.startswith("s3") else None
            location = Location(url, storage_options=options)
            location.ensure()
            locations[name] = location
        return Home(
            catalog=self._catalog(),
            keystore=keystore,
            pepper=pepper,
            region=self.region,
            **locations,
        )

    def reader_catalog(self) -> Catalog:
        """The catalog for read-only commands: the home must be made, but no key is opened
        (an analyst's reads need none)."""
        self.check_home()
        return Catalog(
            self.catalog_target(),
            lock_timeout=self.lock_timeout_seconds,
            reader_memory_limit=self.reader_memory_limit,
            reader_timeout=self.reader_timeout_seconds,
        )


class ParameterRefused(TerminalError, ValueError):
    """A deployment run was given a home or settings as a parameter."""


# Flow parameters that a notebook, a test or the CLI passes in process and a deployment run
# never does: kept out of the deployments' parameter schema, so the Prefect UI offers an
# operator only what an operator sets (shard, day, dry run), and refused by :func:`for_run`.
RunHome = SkipJsonSchema[Home | None]
RunSettings = SkipJsonSchema[Settings | None]


def for_run(
    home: Home | None, settings: Settings | None, **in_process: object
) -> tuple[Settings, Home]:
    """The settings and home a flow run uses. Called in process (a notebook, a test), a
    flow takes them as arguments; a deployment run takes them from its worker's environment
    only, so a Prefect API user cannot point a scheduled flow at other locations or keys
    with a run parameter (README, "Deploying"). ``in_process`` names the flow's other
    in-process-only parameters (a progress callback, a grace period): a deployment run
    given any of them is refused too."""
    from prefect.runtime import deployment

    if deployment.id is not None:
        given = [
            name
            for name, value in {"home": home, "settings": settings, **in_process}.items()
            if value is not None
        ]
        if given:
            raise ParameterRefused(
                f"a deployment run takes {', '.join(given)} from the worker's environment,"
                " not from run parameters"
            )
    settings = settings or Settings.load()
    return settings, home or settings.build_home()


def prefect_api_configured() -> bool:
    """Whether a Prefect server is named where Prefect 3 looks for one: ``PREFECT_API_URL``
    (any case) in the environment or in ``.env``; ``[api] url`` in ``prefect.toml`` or
    ``[tool.prefect.api] url`` in ``pyproject.toml`` of the working folder; or the active
    profile of the profiles file Prefect would read (``PREFECT_PROFILES_PATH`` or
    ``profiles_path`` in those files, else that of a ``PREFECT_HOME`` the user set; the CLI
    points an unset ``PREFECT_HOME`` at the home, so ``~/.prefect`` is never read). Else the
    CLI records its runs under the home's own Prefect. Read without importing Prefect
    (which would fix its settings before the CLI can point it at the home); a settings file
    that cannot be read counts as naming one, so Prefect decides."""
    import dotenv

    if any(k.upper() == "PREFECT_API_URL" and v.strip() for k, v in os.environ.items()):
        return True
    try:
        dot = dotenv.dotenv_values(".env") if Path(".env").is_file() else {}
        local = _toml(Path("prefect.toml"))
        project = _table(_table(_toml(Path("pyproject.toml")), "tool"), "prefect")
    except (OSError, UnicodeDecodeError, ValueError):
        return True
    if any(k.upper() == "PREFECT_API_URL" and (v or "").strip() for k, v in dot.items()):
        return True
    for table in (local, project):
        api = table.get("api", {})
        if isinstance(api, dict) and str(api.get("url") or "").strip():
            return True
    # Where Prefect finds its profiles file (prefect/settings/sources.py, _get_profiles_path).
    profiles_path = (
        os.environ.get("PREFECT_PROFILES_PATH")
        or dot.get("PREFECT_PROFILES_PATH")
        or local.get("profiles_path")
        or project.get("profiles_path")
    )
    if not profiles_path and os.environ.get("PREFECT_HOME"):
        profiles_path = str(Path(os.environ["PREFECT_HOME"]) / "profiles.toml")
    if not profiles_path:
        return False
    try:
        data = _toml(Path(str(profiles_path)))
    except (OSError, UnicodeDecodeError, ValueError):
        return True
    profiles = data.get("profiles", {})
    if not isinstance(profiles, dict):
        return True
    active = os.environ.get("PREFECT_PROFILE") or data.get("active") or "ephemeral"
    profile = profiles.get(active) or profiles.get(data.get("active") or "ephemeral") or {}
    return isinstance(profile, dict) and bool(str(profile.get("PREFECT_API_URL") or "").strip())


def _table(data: dict[str, Any], key: str) -> dict[str, Any]:
    """``data[key]`` where it is a table, {} where absent; ValueError for anything else (a
    ``tool = "x"`` in someone's pyproject.toml)."""
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ValueError(f"{key} is not a table")
    return value


def _toml(path: Path) -> dict[str, Any]:
    """A TOML file's tables, or none where there is no file (ValueError when malformed)."""
    import tomllib

    if not path.is_file():
        return {}
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def notebook_home(start: Path | None = None) -> Home:
    """The home a notebook works on: ``DROPVAULT_HOME`` when set; else ``.dropvault`` in the
    project, found by walking up from the notebook's folder to the nearest folder that holds
    a made home or ``pyproject.toml`` (so a notebook under ``notebooks/`` uses the project's
    home, never one of its own folder). A home not made yet is one clear error, and nothing
    is created."""
    if os.environ.get("DROPVAULT_HOME"):
        settings = Settings.load()
    else:
        here = (start or Path.cwd()).resolve()
        root = next(
            (
                folder
                for folder in (here, *here.parents)
                if (folder / ".dropvault" / HomeRecord.FILE).exists()
                or (folder / "pyproject.toml").exists()
            ),
            here,
        )
        settings = Settings.load(home=root / ".dropvault")
    if HomeRecord.read(settings.home.resolve()) is None:
        raise SettingsError(
            f"no dropvault home at {settings.home.resolve()}: run `dropvault demo` (or"
            " `dropvault init`) in the project folder first, or set DROPVAULT_HOME"
        )
    return settings.build_home()


def quiet_prefect_defaults() -> None:
    """Defaults for running flows from the CLI with no server: no telemetry, quiet logs.

    Only sets what the user has not set.
    """
    import os

    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    # The first start of the embedded server migrates its database: slow on a new machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def server_start_timeout() -> float:
    """Seconds a command waits for its own Prefect server to answer: Prefect's setting for
    its temporary server (``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``, 180 unless
    set: the first start migrates the home's Prefect database)."""
    name = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
    raw = os.environ.get(name, "180")
    # Prefect reads it too, as a whole number: refuse here what it would refuse later.
    if not re.fullmatch(r"\d+(?:_\d+)*(?:\.0*)?", raw.strip()):
        raise SettingsError(f"{name}: {raw!r} is not a whole number of seconds")
    seconds = float(raw.strip().replace("_", ""))
    if not seconds > 0:
        raise SettingsError(f"{name}: {raw!r} must be more than 0 seconds")
    return seconds


def embedded_prefect_db(home: Path) -> Path:
    """The Prefect database a command with no server of the user's records its runs in."""
    prefect_home = os.environ.get("PREFECT_HOME")
    return (Path(prefect_home) if prefect_home else home.resolve() / "prefect") / "prefect.db"


def server_environment() -> dict[str, str]:
    """The environment for the home's kept Prefect server: this process's, less the API
    URL (the server is its own API)."""
    return {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}


_on_home_server: list[str] = []  # the kept server's URL, once this command found it
_on_command_server: list[str] = []  # the command's own server's URL, once started


def use_home_server(url: str) -> None:
    """Run this command's flows against the home's kept Prefect server
    (:mod:`dropvault.flows.home_server`). Must run before Prefect reads its settings.
    The loopback address goes into ``NO_PROXY``: a proxy set for the user's traffic must
    not stand in for the home's own server."""
    os.environ["PREFECT_API_URL"] = url
    # Both spellings get the union: urllib (botocore) prefers the lower-case one, and a new
    # lower-case list must not hide an upper-case one of the user's (an S3 endpoint in it).
    hosts = [
        h.strip()
        for name in ("no_proxy", "NO_PROXY")
        for h in os.environ.get(name, "").split(",")
        if h.strip()
    ]
    joined = ",".join(dict.fromkeys([*hosts, "127.0.0.1"]))
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = joined
    _on_home_server.append(url)


def use_command_server(url: str) -> None:
    """Run this command's flows against the server it started for itself
    (``CommandServer``), which dies with it: as :func:`use_home_server`, and catalog writes
    take no Prefect slot (see :func:`_prefect_server`)."""
    use_home_server(url)
    _on_command_server.append(url)


def home_server_attached() -> bool:
    """Whether this command found the home's kept server or started its own (not a
    PREFECT_API_URL of the user's): an ingest with nothing to do then still answers without
    a flow run."""
    return bool(_on_home_server)


def embedded_prefect_home(home: Path) -> None:
    """For the demo: keep Prefect's own database under the dropvault home.

    The demo then needs no server and no state outside its home, and a database
    left in ``~/.prefect`` by another Prefect version cannot stop it. Must run
    before Prefect is imported; an explicit ``PREFECT_HOME`` wins.
    """
    import os

    if "PREFECT_HOME" not in os.environ:
        prefect_home = home.resolve() / "prefect"
        prefect_home.mkdir(parents=True, exist_ok=True)
        os.environ["PREFECT_HOME"] = str(prefect_home)
