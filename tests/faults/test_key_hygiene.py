"""Key hygiene: key files are 0600, and no key material and no PHI appears in the logs of a
full demo (debug level), in Prefect's own database (flow parameters, logs, artifacts), in
the catalog, or in the messages of the errors a user can provoke."""

from __future__ import annotations

import base64
import io
import os
import stat
import subprocess
from pathlib import Path

import pydicom
import pytest

from dropvault.storage.home import Home
from dropvault.tasks.phi import open_fields
from tests.helpers import EXE

pytestmark = pytest.mark.integration


def forms(secret: bytes) -> list[bytes]:
    """The ways a key could leak into text: raw, hex, base64 (standard and URL-safe)."""
    return [
        secret,
        secret.hex().encode(),
        base64.b64encode(secret),
        base64.urlsafe_b64encode(secret).rstrip(b"="),
    ]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A full demo on its own embedded Prefect server, logging at DEBUG; its output."""
    home = tmp_path_factory.mktemp("hygiene") / ".dropvault"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DROPVAULT_", "PREFECT_API", "PREFECT_HOME"))
    }
    env |= {"DROPVAULT_HOME": str(home), "PREFECT_LOGGING_LEVEL": "DEBUG"}
    proc = subprocess.run(
        [EXE, "demo"], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return home, proc.stdout + proc.stderr


def secrets_of(home: Path) -> tuple[list[bytes], list[bytes]]:
    """Every key (KEK, pepper, each live record key) and the demo's PHI values."""
    h = Home.init(home)
    keys = [(home / "keys" / "kek.key").read_bytes(), h.pepper]
    phi: set[str] = set()
    studies = h.catalog.query("SELECT study_uid, record_key_id, phi_enc FROM studies")
    for uid, key_id, sealed in studies.itertuples(index=False):
        record_key = h.keystore.unwrap(str(key_id))
        keys.append(record_key)
        phi |= {v for v in open_fields(record_key, str(uid), bytes(sealed)).values() if v}
    names = h.catalog.query("SELECT o.name FROM instances i JOIN objects o USING (object_id)")
    for name in names["name"][:10]:
        with h.vault_store().open(str(name)) as src:
            ds = pydicom.dcmread(io.BytesIO(src.read()), stop_before_pixels=True)
        phi |= {str(ds.PatientName), str(ds.PatientID)}
    assert len(keys) > 10 and len(phi) > 10
    needles = [f for k in keys for f in forms(k)]
    phi_needles = [p.encode() for p in phi if len(p) >= 6]
    return needles, phi_needles


def test_key_files_are_0600(demo: tuple[Path, str]) -> None:
    home, _ = demo
    for path in (home / "keys").iterdir():
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
    assert stat.S_IMODE((home / "keys").stat().st_mode) & 0o077 == 0


def test_no_key_and_no_phi_in_logs_prefect_db_catalog_or_artifacts(
    demo: tuple[Path, str],
) -> None:
    home, output = demo
    keys, phi = secrets_of(home)
    places: dict[str, bytes] = {"demo output (DEBUG)": output.encode()}
    for path in (home / "prefect").rglob("*"):
        if path.is_file():
            places[f"prefect/{path.name}"] = path.read_bytes()  # flow runs, logs, artifacts
    places["catalog"] = (home / "catalog.duckdb").read_bytes()
    for path in (home / "quarantine").rglob("*.json"):
        places[f"quarantine/{path.name}"] = path.read_bytes()
    for path in (home / "exports").rglob("*"):
        if path.is_file():
            places[f"exports/{path.name}"] = path.read_bytes()
    assert any(name.startswith("prefect/") for name in places)
    leaks = [
        (where, "key" if needle in keys else "phi")
        for where, blob in places.items()
        for needle in keys + phi
        if needle in blob
    ]
    assert leaks == []


def test_error_messages_carry_no_phi_or_keys(demo: tuple[Path, str], tmp_path: Path) -> None:
    home, _ = demo
    keys, phi = secrets_of(home)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DROPVAULT_")}
    env["DROPVAULT_HOME"] = str(home)
    env["PREFECT_HOME"] = str(home / "prefect")
    runs = [
        ["export", "1.2.3.4.5", "--out", str(tmp_path / "x.dcm")],
        ["sql", "SELECT * FROM no_such_table"],
        ["sql", "DELETE FROM studies"],
        ["quarantine", "export", "no-such-id", "--out", str(tmp_path / "q")],
    ]
    wrong_kek = base64.b64encode(b"\x01" * 32).decode()
    messages = []
    for args in runs:
        proc = subprocess.run(
            [EXE, *args], env=env, capture_output=True, text=True, timeout=300, check=False
        )
        assert proc.returncode != 0
        messages.append(proc.stderr)
    proc = subprocess.run(
        [EXE, "ingest"],
        env=env | {"DROPVAULT_KEK": wrong_kek},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 1 and "KEK" in proc.stderr
    messages.append(proc.stderr)
    blob = "\n".join(messages).encode()
    assert [n for n in keys + phi if n in blob] == []
    for message in messages:  # each failure ends in one clear line
        assert message.strip().splitlines()[-1].startswith("error: ")
