"""KEK rotation as an operation (issue #25): a process that opened the keystore before a
rotation never wraps a key under the discarded KEK, a rotation killed (SIGKILL) at any
step leaves a home that starts and rotates again, and ``dropvault rotate-kek`` racing an
ingest loses no image."""

from __future__ import annotations

import base64
import io
import random
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

from dropvault.flows.ingest import ingest_drops
from dropvault.flows.settings import Settings
from dropvault.storage import keystore
from dropvault.storage.home import Home, HomeRecord
from dropvault.storage.keystore import KEKRotatedError, Keystore
from dropvault.storage.vault import decrypt_segments, encrypt_stream
from dropvault.tasks import samples
from dropvault.tasks.exports import export_instance
from tests.helpers import EXE, cli_env


def _sealed(store: Keystore) -> tuple[str, bytes]:
    key_id, key = store.create()
    blob = io.BytesIO()
    encrypt_stream(io.BytesIO(b"image bytes"), blob, key_id, key)
    return key_id, blob.getvalue()


def _opens(keys: Path, blob: bytes) -> bool:
    return b"".join(decrypt_segments(io.BytesIO(blob), Keystore.local(keys))) == b"image bytes"


def test_a_process_opened_before_a_rotation_follows_it(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    Keystore.create_local(keys)
    ingest = Keystore.local(keys)  # a long run, opened before the rotation
    old_id, old_blob = _sealed(ingest)
    assert Keystore.local(keys).rotate_local() == 1  # another process rotates
    new_id, new_blob = _sealed(ingest)  # the old process makes a key after the rotation
    assert ingest.live([old_id, new_id]) == {old_id, new_id}
    # Every key is under the KEK in kek.key now, so a fresh process opens both.
    assert _opens(keys, old_blob) and _opens(keys, new_blob)
    assert Keystore.local(keys).rotate_local() == 2  # and rotates again


def test_a_kek_given_as_a_setting_refuses_after_a_rotation(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    old = secrets.token_bytes(32)
    writer = Keystore(keys, old, create=True)
    key_id, _ = writer.create()
    reader = Keystore(keys, old)  # another process, no key cached yet
    new = secrets.token_bytes(32)
    Keystore(keys, old).rotate(new)
    for call in (writer.create, lambda: reader.unwrap(key_id), lambda: writer.live([key_id])):
        with pytest.raises(KEKRotatedError, match="restart it with the new KEK"):
            call()
    # Nothing was written under the old KEK; the new one opens every key.
    assert Keystore(keys, new).live([key_id]) == {key_id}


ROTATE_AND_DIE = """
import os, signal, sys
from dropvault.storage import keystore
from dropvault.storage.home import Home
keystore.FAULTS[sys.argv[2]] = lambda: os.kill(os.getpid(), signal.SIGKILL)
Home.local(sys.argv[1]).keystore.rotate_local()
"""


@pytest.mark.parametrize("step", ["after_new_file", "before_commit", "after_commit"])
def test_a_rotation_killed_at_any_step_leaves_a_home_that_starts(tmp_path: Path, step: str) -> None:
    root = tmp_path / "home"
    home = Home.init(root)
    key_id, blob = _sealed(home.keystore)
    proc = subprocess.run(
        [sys.executable, "-c", ROTATE_AND_DIE, str(root), step],
        capture_output=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    again = Home.local(root)  # starts: the rotation is finished or undone
    assert again.keystore.unwrap(key_id)
    assert _opens(root / "keys", blob)
    assert not (root / "keys" / "kek.key.new").exists()
    assert again.keystore.rotate_local() == 1  # a later rotation completes
    assert _opens(root / "keys", blob)
    Home.local(root)  # and the home still starts


def test_rotate_kek_with_the_kek_as_a_setting(tmp_path: Path) -> None:
    root = tmp_path / "home"
    old, new = (base64.b64encode(secrets.token_bytes(32)).decode() for _ in range(2))
    base = Settings(home=root, kek=old, pepper=base64.b64encode(b"p" * 32).decode())
    home, _ = base.init_home()
    key_id, blob = _sealed(home.keystore)
    with pytest.raises(Exception, match="DROPVAULT_NEW_KEK is not set"):
        base.rotate_kek()
    assert "set DROPVAULT_KEK" in base.model_copy(update={"new_kek": SecretStr(new)}).rotate_kek()
    with pytest.raises(Exception, match="DROPVAULT_KEK"):
        base.build_home()  # the old KEK no longer opens the home
    after = base.model_copy(update={"kek": SecretStr(new)}).build_home()
    assert after.keystore.unwrap(key_id)
    assert HomeRecord.read(root) is not None


@pytest.mark.integration
def test_rotate_kek_racing_an_ingest_loses_no_image(tmp_path: Path) -> None:
    """``dropvault rotate-kek`` (real processes) three times while an ingest runs."""
    root = tmp_path / "home"
    home = Home.init(root)
    rng = random.Random(25)
    files: dict[str, bytes] = {}
    for i in range(6):
        uid, study = samples.make_study(rng, samples.make_patient(rng, i), 40, "CT_small.dcm")
        samples.write_drop(home.drops, "fac", f"d{i}", study, owners={uid: "user:ann"})
        files.update(study)
    errors: list[BaseException] = []

    def rotate() -> None:
        try:
            for _ in range(3):
                subprocess.run(
                    [EXE, "rotate-kek"], env=cli_env(root), check=True, capture_output=True
                )
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    rotator = threading.Thread(target=rotate)
    rotator.start()
    stats = ingest_drops(home=home, settings=Settings(quiet_seconds=0, batch_files=20))
    rotator.join()
    assert not errors
    assert stats.ingested == len(files)
    fresh = Home.local(root)  # a new process's view: only the files
    sops = fresh.catalog.query("SELECT sop_instance_uid FROM instances")["sop_instance_uid"]
    out = tmp_path / "out"
    for sop in sops:
        export_instance(fresh, str(sop), out / f"{sop}.dcm")
    assert sorted(p.read_bytes() for p in out.iterdir()) == sorted(files.values())
    assert (root / "keys" / "kek.key").stat().st_mode & 0o777 == 0o600


@pytest.mark.integration
def test_a_start_during_a_rotation_does_not_take_its_new_key_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rotation that has written kek.key.new and not yet committed, while another process
    starts on the home (which settles a left-over kek.key.new): no key is lost."""
    root = tmp_path / "home"
    home = Home.init(root)
    sealed = [_sealed(home.keystore) for _ in range(5)]
    started = threading.Event()

    def pause() -> None:
        started.set()
        # The window, long enough for the other process to start within it: the new file
        # is written, the re-wrap not committed.
        time.sleep(8)

    monkeypatch.setitem(keystore.FAULTS, "after_new_file", pause)
    rotation = threading.Thread(target=Home.local(root).keystore.rotate_local)
    rotation.start()
    assert started.wait(30)
    status = subprocess.run(
        [EXE, "ingest"], env=cli_env(root), capture_output=True, text=True, timeout=300,
        check=False,
    )  # fmt: skip
    rotation.join()
    assert status.returncode == 0, status.stderr[-2000:]
    assert not (root / "keys" / "kek.key.new").exists()
    for _, blob in sealed:
        assert _opens(root / "keys", blob)
    assert Home.local(root).keystore.rotate_local() == 5
