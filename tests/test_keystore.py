"""Keystore: 0600 files, rotation without re-encryption, destruction that leaves no bytes."""

from __future__ import annotations

import io
import multiprocessing
import stat
from pathlib import Path
from typing import Any

import pytest

from dropvault.storage.home import Home
from dropvault.storage.keystore import (
    KeyDestroyedError,
    Keystore,
    MissingKEKError,
    UnknownKeyError,
    WrongKEKError,
    kek_id,
)
from dropvault.storage.vault import decrypt_segments, encrypt_stream


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_key_files_are_created_0600(tmp_path: Path) -> None:
    store = Keystore.create_local(tmp_path / "keys")
    store.create()
    assert mode(tmp_path / "keys" / "kek.key") == 0o600
    assert mode(store.path) == 0o600


def test_rotate_then_decrypt_without_reencrypting(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    store = Keystore.create_local(keys)
    key_id, key = store.create()
    blob = io.BytesIO()
    encrypt_stream(io.BytesIO(b"image bytes"), blob, key_id, key)
    old_kek = (keys / "kek.key").read_bytes()
    assert store.rotate_local() == 1
    assert (keys / "kek.key").read_bytes() != old_kek
    assert mode(keys / "kek.key") == 0o600
    fresh = Keystore.local(keys)  # a new process: only the files
    assert b"".join(decrypt_segments(io.BytesIO(blob.getvalue()), fresh)) == b"image bytes"
    with pytest.raises(WrongKEKError):
        Keystore(keys, old_kek).unwrap(key_id)


def test_interrupted_rotation_recovers_the_new_kek(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    store = Keystore.create_local(keys)
    key_id, key = store.create()
    new_kek = b"\x11" * 32
    store.rotate(new_kek)  # committed, but the key file was never swapped
    (keys / "kek.key.new").write_bytes(new_kek)
    (keys / "kek.key.new").chmod(0o600)  # as rotate_local writes it
    assert Keystore.local(keys).unwrap(key_id) == key
    assert not (keys / "kek.key.new").exists()


def test_destroy_then_decrypt_fails_and_bytes_are_gone(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    store = Keystore.create_local(keys)
    keep_id, _ = store.create()
    key_id, key = store.create()
    wrapped = store.wrapped_bytes(key_id)
    assert wrapped is not None
    blob = io.BytesIO()
    encrypt_stream(io.BytesIO(b"secret study"), blob, key_id, key)
    assert store.destroy([key_id]) == 1
    fresh = Keystore.local(keys)
    with pytest.raises(KeyDestroyedError):
        fresh.unwrap(key_id)
    with pytest.raises(KeyDestroyedError):
        b"".join(decrypt_segments(io.BytesIO(blob.getvalue()), fresh))
    fresh.unwrap(keep_id)  # other keys unaffected
    for path in keys.iterdir():
        data = path.read_bytes()
        assert wrapped not in data, path.name
        assert key not in data, path.name
    with pytest.raises(UnknownKeyError):
        fresh.unwrap("rk_missing")


def test_missing_or_wrong_kek_fails_at_start_and_changes_nothing(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    store = Keystore.create_local(keys)
    key_id, key = store.create()
    (keys / "kek.key").rename(tmp_path / "kek.backup")
    with pytest.raises(MissingKEKError, match="restore the key file or set DROPVAULT_KEK"):
        Keystore.local(keys)
    assert not (keys / "kek.key").exists()  # no fresh KEK was made over the old keys
    with pytest.raises(WrongKEKError, match="does not unwrap"):
        Keystore(keys, b"\x07" * 32)
    (tmp_path / "kek.backup").rename(keys / "kek.key")
    assert Keystore.local(keys).unwrap(key_id) == key


def _start_worker(directory: str, barrier: Any, out: Any) -> None:
    barrier.wait(timeout=60)
    try:
        home = Home.init(Path(directory))
        out.put((kek_id(home.keystore._kek), home.pepper.hex()))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out.put(("error", repr(exc)))


def test_inits_racing_on_a_fresh_home_share_one_kek(tmp_path: Path) -> None:
    """Six processes make the same new home at once: none fails, and all end with the same
    KEK and pepper (a second KEK would orphan every record key)."""
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(6), ctx.Queue()
    procs = [
        ctx.Process(target=_start_worker, args=(str(tmp_path), barrier, out)) for _ in range(6)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join()
    assert len(set(results)) == 1 and results[0][0] != "error", results
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == [
        "kek.key",
        "keystore.sqlite",
        "pepper.key",
    ]
