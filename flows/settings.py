"""The one place that reads the environment (prefix ``DROPVAULT_``).

Every location derives from ``DROPVAULT_HOME`` (default ``./.dropvault``)
unless its own ``DROPVAULT_<NAME>_URL`` is set. Keys: ``DROPVAULT_KEK`` and
``DROPVAULT_PEPPER`` (base64 of 32 bytes) in production; without them the
embedded default makes 0600 key files under ``{home}/keys``. S3 uses the
usual AWS variables, or ``DROPVAULT_S3_ENDPOINT_URL`` and friends.

A bad value fails at start with a message that names the setting.
"""

from __future__ import annotations

import base64
import binascii
import functools
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from flows.limits import catalog_write_slot
from storage.catalog import Catalog
from storage.ducklake import EXTENSIONS, Lake, LakeSetupError, extension_path
from storage.home import LOCATIONS, Home
from storage.keystore import Keystore, load_or_create_secret
from storage.locations import InsecureEndpointError, Location, check_endpoint_tls

SCHEMES = {"file", "memory", "s3", "s3a"}
DUCKLAKE_PREFIX = "ducklake:postgres:"


class SettingsError(ValueError):
    """A setting is wrong; the message names it."""


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
    # A local DuckDB file path or file:// URL, or ducklake:postgres:<libpq conninfo>
    catalog_url: str | None = None
    catalog_data_url: str | None = None  # DuckLake's Parquet files: s3://bucket/prefix/
    catalog_schema: str | None = None  # DuckLake's metadata schema in PostgreSQL
    keys_dir: Path | None = None

    quiet_seconds: float = Field(default=120.0, ge=0)
    incomplete_seconds: float = Field(default=86400.0, gt=0)
    max_file_bytes: int = Field(default=4 * 1024**3, gt=0)
    batch_files: int = Field(default=500, gt=0)
    batch_bytes: int = Field(default=256 * 1024**2, gt=0)
    # Ingest batches one flow runs at once (threads): one parses while another writes.
    batches_in_flight: int = Field(default=2, ge=1, le=16)
    orphan_grace_seconds: float = Field(default=3600.0, ge=0)
    lock_timeout_seconds: float = Field(default=120.0, gt=0)
    region: str = "local"
    deletion_at_risk_hours: float = Field(default=6.0, gt=0)
    sweep_batch: int = Field(default=500, gt=0)
    beacon_retention: Literal["delete", "keep"] = "delete"
    beacon_memory_limit: str = "1GB"

    kek: SecretStr | None = None
    pepper: SecretStr | None = None

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
    )
    @classmethod
    def _url(cls, value: str | None, info: Any) -> str | None:
        return _check_url(value, f"DROPVAULT_{info.field_name.upper()}")

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

    @field_validator("catalog_data_url")
    @classmethod
    def _catalog_data_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("file", "s3", "s3a"):
            raise ValueError("DROPVAULT_CATALOG_DATA_URL must be an s3:// or file:// URL")
        return value

    @field_validator("s3_endpoint_url")
    @classmethod
    def _tls(cls, value: str | None) -> str | None:
        try:
            check_endpoint_tls(value)
        except InsecureEndpointError as exc:
            raise ValueError(f"DROPVAULT_S3_ENDPOINT_URL: {exc}") from exc
        return value

    @model_validator(mode="after")
    def _keys(self) -> Settings:
        _decode_key(self.kek, "DROPVAULT_KEK")
        _decode_key(self.pepper, "DROPVAULT_PEPPER")
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

    def build_home(self) -> Home:
        """Every location and store, ready to use (local folders and key files created)."""
        keys = self.keys_dir or self.home.resolve() / "keys"
        locations: dict[str, Location] = {}
        for name in LOCATIONS:
            url = self.location_url(name)
            options = self.storage_options() if urlsplit(url).scheme.startswith("s3") else None
            location = Location(url, storage_options=options)
            location.ensure()
            locations[name] = location
        kek = _decode_key(self.kek, "DROPVAULT_KEK")
        keystore = Keystore(keys, kek) if kek else Keystore.local(keys)
        pepper = _decode_key(self.pepper, "DROPVAULT_PEPPER") or load_or_create_secret(
            keys / "pepper.key"
        )
        return Home(
            catalog=Catalog(
                self.catalog_target(),
                lock_timeout=self.lock_timeout_seconds,
                write_guard=functools.partial(catalog_write_slot, self.lock_timeout_seconds),
            ),
            keystore=keystore,
            pepper=pepper,
            region=self.region,
            **locations,
        )


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
