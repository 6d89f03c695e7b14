"""A dropvault home: every location and store one deployment uses, as objects.

``flows/settings.py`` builds one from the environment; a notebook or a test
builds one from its own locations (``Home.local(path)`` for a folder), so any
task can run against any home without touching the environment.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from storage.catalog import Catalog
from storage.keystore import Keystore, load_or_create_secret
from storage.locations import Location
from storage.vault import Vault

LOCATIONS = ("drops", "vault", "quarantine", "archive", "manifests", "beacons", "exports")


@dataclass
class Home:
    drops: Location
    vault: Location
    quarantine: Location
    archive: Location
    manifests: Location
    beacons: Location
    exports: Location
    catalog: Catalog
    keystore: Keystore
    pepper: bytes  # HMAC key for patient_key and other pseudonyms
    region: str = "local"

    @classmethod
    def local(cls, root: Path | str) -> Home:
        """The embedded default layout below one folder (key files made 0600 on first use)."""
        root = Path(root).resolve()
        keys = root / "keys"
        locations = {}
        for name in LOCATIONS:
            (root / name).mkdir(parents=True, exist_ok=True)
            locations[name] = Location((root / name).as_uri())
        return cls(
            **locations,  # type: ignore[arg-type]
            catalog=Catalog(root / "catalog.duckdb"),
            keystore=Keystore.local(keys),
            pepper=load_or_create_secret(keys / "pepper.key"),
        )

    def vault_store(self) -> Vault:
        return Vault(self.vault, self.keystore)

    def quarantine_store(self) -> Vault:
        return Vault(self.quarantine, self.keystore)

    def archive_store(self) -> Vault:
        return Vault(self.archive, self.keystore)

    def ensure(self) -> None:
        for name in LOCATIONS:
            getattr(self, name).ensure()
