"""P10: a home is made on purpose (``dropvault init``), and its keys are checked at every
start, never made or replaced by accident. Includes a KEK sealed by KMS (moto's)."""

from __future__ import annotations

import base64
import json
import os
import random
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import boto3
import pytest
from typer.testing import CliRunner

from dropvault.flows.cli import app
from dropvault.flows.deletion import deletion_sweep
from dropvault.flows.ingest import ingest_drops
from dropvault.flows.settings import Settings, SettingsError
from dropvault.storage.home import HomeRecord
from dropvault.tasks import samples
from dropvault.tasks.exports import export_instance

pytestmark = pytest.mark.integration


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def cli(env: dict[str, str], *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env=env)
    return result.exit_code, result.output


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for name in list(os.environ):
        if name.startswith("DROPVAULT_"):
            monkeypatch.delenv(name)
    yield monkeypatch


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


COMMANDS = [
    ["status"],
    ["sql", "SELECT 1"],
    ["ingest"],
    ["sweep"],
    ["access-list", "user:a"],
    ["shares"],
    ["deletions"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_commands_on_a_home_never_made_create_nothing(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, command: list[str]
) -> None:
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "other").mkdir()
    before = listing(parent)
    for home in (parent / "missing", parent / "other"):
        code, out = cli({"DROPVAULT_HOME": str(home)}, *command)
        assert code == 1
        assert out.strip() == (
            f"error: invalid setting: DROPVAULT_HOME={home} is not a dropvault home:"
            " run dropvault init"
        ), out
        assert listing(parent) == before


def test_empty_home_setting_is_invalid(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.chdir(tmp_path)
    for command in (["status"], ["init"], ["demo"]):
        code, out = cli({"DROPVAULT_HOME": ""}, *command)
        assert code == 1 and "DROPVAULT_HOME" in out and "empty" in out, out
    assert listing(tmp_path) == []
    code, out = cli({"DROPVAULT_HOME": os.fsdecode(bytes(tmp_path) + b"/caf\xe9")}, "init")
    assert code == 1 and "not valid UTF-8" in out, out
    assert listing(tmp_path) == []


def test_init_makes_a_home_once_and_says_so(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    env = {"DROPVAULT_HOME": str(tmp_path / "h")}
    code, out = cli(env, "init")
    assert code == 0 and out.startswith("made dropvault home"), out
    keys = tmp_path / "h" / "keys"
    kek = (keys / "kek.key").read_bytes()
    for name in ("kek.key", "pepper.key", "keystore.sqlite"):
        assert stat.S_IMODE((keys / name).stat().st_mode) == 0o600
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    record = json.loads((tmp_path / "h" / HomeRecord.FILE).read_text())
    assert record["kek_source"] == "file" and len(record["kek_check"]) == 32
    assert b64(kek) not in json.dumps(record) and kek.hex() not in json.dumps(record)
    code, out = cli(env, "init")
    assert code == 0 and "already a dropvault home" in out
    assert (keys / "kek.key").read_bytes() == kek  # never replaced
    code, out = cli(env, "status")
    assert code == 0, out


def _drop_study(settings: Settings, seed: int, name: str) -> tuple[str, dict[str, bytes]]:
    home = settings.build_home()
    rng = random.Random(seed)  # noqa: S311 - test data
    study_uid, files = samples.make_study(rng, samples.make_patient(rng, 7), 2, "CT_small.dcm")
    samples.write_drop(home.drops, "fac-a", name, files, owners={study_uid: "user:alice"})
    return study_uid, files


def _delete(settings: Settings, study_uid: str) -> None:
    home = settings.build_home()
    row = {
        "request_id": "del-1",
        "owner": "user:alice",
        "study_uid": study_uid,
        "requested_at": datetime.now(UTC).isoformat(),
        "keep_archive": False,
    }
    home.manifests.put_bytes("deletions/req.jsonl", (json.dumps(row) + "\n").encode())
    result = deletion_sweep(home=home, settings=settings)
    assert result.summary()["studies_deleted"] == 1


@pytest.mark.parametrize("fault", ["pepper unset", "wrong pepper", "wrong KEK", "KEK unset"])
def test_a_missing_or_different_key_stops_the_run_and_the_study_stays_deleted(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, fault: str
) -> None:
    """The outside review's case: a home whose pepper (or KEK) came from the environment,
    a deleted study, then a start without that key and a late file of the study."""
    clean_env.setenv("DROPVAULT_HOME", str(tmp_path / "h"))
    clean_env.setenv("DROPVAULT_QUIET_SECONDS", "0")
    clean_env.setenv("DROPVAULT_PEPPER", b64(b"p" * 32))
    clean_env.setenv("DROPVAULT_KEK", b64(b"k" * 32))
    settings = Settings.load()
    settings.init_home()
    study_uid, files = _drop_study(settings, 1, "d1")
    assert ingest_drops(settings=settings).ingested == 2
    _delete(settings, study_uid)
    keys_before = listing(tmp_path / "h" / "keys")

    {
        "pepper unset": lambda: clean_env.delenv("DROPVAULT_PEPPER"),
        "wrong pepper": lambda: clean_env.setenv("DROPVAULT_PEPPER", b64(b"q" * 32)),
        "wrong KEK": lambda: clean_env.setenv("DROPVAULT_KEK", b64(b"j" * 32)),
        "KEK unset": lambda: clean_env.delenv("DROPVAULT_KEK"),
    }[fault]()
    named = "DROPVAULT_PEPPER" if "pepper" in fault else "DROPVAULT_KEK"
    # The late file of the deleted study, dropped by hand (no home can be built to do it).
    drop = tmp_path / "h" / "drops" / "fac-a" / "late"
    drop.mkdir(parents=True)
    for name, data in files.items():
        (drop / Path(name).name).write_bytes(data)
    for command in (["ingest"], ["sweep"], ["export", "1.2.3", "--out", str(tmp_path / "x")]):
        code, out = cli(dict(os.environ), *command)
        assert code == 1 and named in out and out.count("\n") == 1, (command, out)
    with pytest.raises(SettingsError, match=named):
        ingest_drops(settings=Settings.load())
    assert listing(tmp_path / "h" / "keys") == keys_before  # no key was made
    assert sorted(p.name for p in drop.iterdir()) == sorted(Path(n).name for n in files)

    # With the right keys back, the late file is quarantined as deleted_by_owner.
    clean_env.setenv("DROPVAULT_PEPPER", b64(b"p" * 32))
    clean_env.setenv("DROPVAULT_KEK", b64(b"k" * 32))
    settings = Settings.load()
    stats = ingest_drops(settings=settings)
    assert stats.ingested == 0
    catalog = settings.build_home().catalog
    assert catalog.query("SELECT count(*) AS n FROM studies")["n"][0] == 0
    reasons = catalog.query("SELECT reason FROM quarantine")["reason"].tolist()
    assert reasons and set(reasons) == {"deleted_by_owner"}


def test_a_local_key_file_replaced_is_refused(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("DROPVAULT_HOME", str(tmp_path / "h"))
    Settings.load().init_home()
    pepper = tmp_path / "h" / "keys" / "pepper.key"
    pepper.unlink()
    code, out = cli(dict(os.environ), "status")
    assert code == 1 and "DROPVAULT_PEPPER" in out and "pepper.key is missing" in out
    assert not pepper.exists()
    pepper.write_bytes(b"x" * 32)
    pepper.chmod(0o600)
    code, out = cli(dict(os.environ), "ingest")
    assert code == 1 and "DROPVAULT_PEPPER" in out and "check value differs" in out
    kek = tmp_path / "h" / "keys" / "kek.key"
    kek.unlink()
    code, out = cli(dict(os.environ), "ingest")
    assert code == 1 and "DROPVAULT_KEK" in out and "kek.key is missing" in out
    assert not kek.exists()


def test_kek_sealed_by_kms(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, moto_endpoint: str
) -> None:
    """init, ingest, export; rotate to a new KMS key; export again. Only the KMS ciphertext
    blob is on disk, and a blob opened under another key id is refused."""
    kms = boto3.client("kms", endpoint_url=moto_endpoint, region_name="us-east-1")
    first = kms.create_key(Description="dropvault test")["KeyMetadata"]["KeyId"]
    second = kms.create_key(Description="dropvault test 2")["KeyMetadata"]["KeyId"]
    env = {
        "DROPVAULT_HOME": str(tmp_path / "h"),
        "DROPVAULT_QUIET_SECONDS": "0",
        "DROPVAULT_KEK_KMS_KEY_ID": first,
        "DROPVAULT_KMS_ENDPOINT_URL": moto_endpoint,
        "DROPVAULT_KMS_REGION": "us-east-1",
    }
    for k, v in env.items():
        clean_env.setenv(k, v)
    code, out = cli(dict(os.environ), "init")
    assert code == 0 and "KEK from kms" in out, out
    keys = tmp_path / "h" / "keys"
    assert (keys / "kek.kms").exists() and not (keys / "kek.key").exists()
    assert stat.S_IMODE((keys / "kek.kms").stat().st_mode) == 0o600
    settings = Settings.load()
    home = settings.build_home()
    kek = home.keystore._kek
    assert kek not in (keys / "kek.kms").read_bytes()
    _, files = _drop_study(settings, 3, "d1")
    assert ingest_drops(settings=settings).ingested == 2
    sop = home.catalog.query("SELECT sop_instance_uid FROM instances LIMIT 1").iloc[0, 0]
    export_instance(home, sop, tmp_path / "a.dcm")
    assert (tmp_path / "a.dcm").read_bytes() in files.values()

    code, out = cli(dict(os.environ), "rotate-kms-key", second)
    assert code == 0 and second in out, out
    # The old key id no longer opens the blob: the run stops, naming the setting.
    code, out = cli(dict(os.environ), "status")
    assert code == 1 and "DROPVAULT_KEK_KMS_KEY_ID" in out, out
    clean_env.setenv("DROPVAULT_KEK_KMS_KEY_ID", second)
    home = Settings.load().build_home()
    assert home.keystore._kek == kek  # same KEK: record keys untouched
    export_instance(home, sop, tmp_path / "b.dcm")
    assert (tmp_path / "b.dcm").read_bytes() == (tmp_path / "a.dcm").read_bytes()

    # A KEK given as well as the KMS key is a setting error, not a silent choice.
    clean_env.setenv("DROPVAULT_KEK", b64(b"k" * 32))
    code, out = cli(dict(os.environ), "status")
    assert code == 1 and "DROPVAULT_KEK_KMS_KEY_ID" in out


def test_a_missing_or_empty_keystore_is_refused_not_remade(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("DROPVAULT_HOME", str(tmp_path / "h"))
    Settings.load().init_home()
    store = tmp_path / "h" / "keys" / "keystore.sqlite"
    saved = store.read_bytes()
    for broken in ("missing", "empty"):
        if broken == "missing":
            store.unlink()
        else:
            store.write_bytes(b"")
        code, out = cli(dict(os.environ), "status")
        assert code == 1 and "DROPVAULT_KEYS_DIR" in out and "restore it" in out, out
        assert (not store.exists()) if broken == "missing" else store.read_bytes() == b""
    store.write_bytes(saved)
    # With the KEK as a setting, a mistyped keys folder is refused, and not made.
    kek = (tmp_path / "h" / "keys" / "kek.key").read_bytes()
    env = {**os.environ, "DROPVAULT_KEK": b64(kek), "DROPVAULT_KEYS_DIR": str(tmp_path / "typo")}
    code, out = cli(env, "status")
    assert code == 1 and "DROPVAULT_KEYS_DIR" in out and not (tmp_path / "typo").exists()


def test_init_makes_no_key_where_data_already_exists(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    """A home that lost its record and a key: init must not mint a replacement (a new pepper
    gives every patient a new pseudonym; a new KEK strands every record key)."""
    root = tmp_path / "h"
    clean_env.setenv("DROPVAULT_HOME", str(root))
    clean_env.setenv("DROPVAULT_QUIET_SECONDS", "0")
    settings = Settings.load()
    settings.init_home()
    _drop_study(settings, 4, "d1")
    assert ingest_drops(settings=settings).ingested == 2
    keys = root / "keys"
    record = (root / HomeRecord.FILE).read_bytes()
    pepper, kek = (keys / "pepper.key").read_bytes(), (keys / "kek.key").read_bytes()

    (root / HomeRecord.FILE).unlink()
    (keys / "pepper.key").unlink()
    code, out = cli(dict(os.environ), "init")
    assert code == 1 and "DROPVAULT_PEPPER" in out and "already holds data" in out, out
    assert not (keys / "pepper.key").exists() and not (root / HomeRecord.FILE).exists()

    (keys / "pepper.key").write_bytes(pepper)
    (keys / "pepper.key").chmod(0o600)
    (keys / "kek.key").unlink()
    code, out = cli(dict(os.environ), "init")
    assert code == 1 and "DROPVAULT_KEK" in out and "record keys" in out, out
    assert not (keys / "kek.key").exists()

    # Restored keys are adopted, and the home works again.
    (keys / "kek.key").write_bytes(kek)
    (keys / "kek.key").chmod(0o600)
    code, out = cli(dict(os.environ), "init")
    assert code == 0 and "made dropvault home" in out, out
    assert (
        json.loads((root / HomeRecord.FILE).read_bytes())["kek_check"]
        == json.loads(record)["kek_check"]
    )
    assert (
        Settings.load().build_home().catalog.query("SELECT count(*) AS n FROM instances")["n"][0]
        == 2
    )


def test_key_files_must_be_private_regular_files(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("DROPVAULT_HOME", str(tmp_path / "h"))
    home, _ = Settings.load().init_home()
    assert home.pepper.hex() not in repr(home) and repr(home.pepper) not in repr(home)
    keys = tmp_path / "h" / "keys"
    (keys / "kek.key").chmod(0o644)
    code, out = cli(dict(os.environ), "status")
    assert code == 1 and "DROPVAULT_KEK" in out and "chmod 600" in out, out
    (keys / "kek.key").chmod(0o600)
    copy = tmp_path / "pepper.copy"
    copy.write_bytes((keys / "pepper.key").read_bytes())
    copy.chmod(0o600)
    (keys / "pepper.key").unlink()
    (keys / "pepper.key").symlink_to(copy)
    code, out = cli(dict(os.environ), "ingest")
    assert code == 1 and "DROPVAULT_PEPPER" in out and "symlink" in out, out


def test_a_password_in_the_catalog_url_is_refused(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    env = {
        "DROPVAULT_HOME": str(tmp_path / "h"),
        "DROPVAULT_CATALOG_URL": "ducklake:postgres:dbname=x host=db password=Hunter2Secret",
        "DROPVAULT_CATALOG_DATA_URL": "s3://b/lake/",
    }
    code, out = cli(env, "status")
    assert code == 1 and "DROPVAULT_CATALOG_URL" in out and "PGPASSWORD" in out
    assert "Hunter2Secret" not in out


def test_incident_on_a_home_never_made_is_one_line(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    code, out = cli(
        {"DROPVAULT_HOME": str(tmp_path / "nope")}, "incident", "--user", "u", "--study", "1.2"
    )
    assert code == 1 and out.count("\n") == 1 and "run dropvault init" in out, out
    assert not (tmp_path / "nope").exists()


def test_a_replaced_keystore_or_a_symlinked_keys_folder_is_refused(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    import sqlite3

    clean_env.setenv("DROPVAULT_HOME", str(tmp_path / "h"))
    Settings.load().init_home()
    keys = tmp_path / "h" / "keys"
    store = keys / "keystore.sqlite"
    saved = store.read_bytes()
    store.unlink()
    with sqlite3.connect(store) as con:  # a SQLite file, but no keystore
        con.execute("CREATE TABLE other (x)")
    store.chmod(0o600)
    code, out = cli(dict(os.environ), "status")
    assert code == 1 and "DROPVAULT_KEYS_DIR" in out and "not a keystore" in out, out
    # Another home's keystore (same KEK file copied too) is not this home's.
    other = tmp_path / "other"
    Settings.load(home=other).init_home()
    store.write_bytes((other / "keys" / "keystore.sqlite").read_bytes())
    code, out = cli(dict(os.environ), "status")
    assert code == 1 and "not the keystore this home was made with" in out, out
    store.write_bytes(saved)
    assert cli(dict(os.environ), "status")[0] == 0
    # A keys folder that is a symlink to an open folder.
    moved = tmp_path / "elsewhere"
    keys.rename(moved)
    moved.chmod(0o777)
    keys.symlink_to(moved)
    code, out = cli(dict(os.environ), "status")
    assert code == 1 and "symlink" in out, out


def test_init_over_data_with_a_mistyped_keys_folder_makes_no_key(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "h"
    clean_env.setenv("DROPVAULT_HOME", str(root))
    clean_env.setenv("DROPVAULT_QUIET_SECONDS", "0")
    settings = Settings.load()
    home, _ = settings.init_home()
    _drop_study(settings, 6, "d1")
    assert ingest_drops(settings=settings).ingested == 2
    pepper = b64(home.pepper)
    (root / HomeRecord.FILE).unlink()  # a home made before records existed
    env = {**os.environ, "DROPVAULT_KEYS_DIR": str(tmp_path / "typo"), "DROPVAULT_PEPPER": pepper}
    code, out = cli(env, "init")
    assert code == 1 and "DROPVAULT_KEK" in out and "already holds data" in out, out
    assert not (tmp_path / "typo" / "kek.key").exists()
    assert not (tmp_path / "typo" / "keystore.sqlite").exists()
