"""DVLT1: round trips, tamper detection and bounded memory."""

from __future__ import annotations

import io
import os
import struct
import tracemalloc
from pathlib import Path

import pytest

from dropvault.storage.keystore import Keystore
from dropvault.storage.locations import Location
from dropvault.storage.vault import TAG, IntegrityError, Vault, decrypt_segments, encrypt_stream

SEG = 4096


@pytest.fixture
def keystore(tmp_path: Path) -> Keystore:
    return Keystore.create_local(tmp_path / "keys")


def seal(keystore: Keystore, data: bytes, segment: int = SEG) -> bytes:
    key_id, key = keystore.create()
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(data), out, key_id, key, segment)
    return out.getvalue()


def unseal(keystore: Keystore, blob: bytes) -> bytes:
    return b"".join(decrypt_segments(io.BytesIO(blob), keystore))


@pytest.mark.parametrize("size", [0, 1, SEG - 1, SEG, SEG + 1, 3 * SEG, 5 * SEG + 17])
def test_round_trip(keystore: Keystore, size: int) -> None:
    data = os.urandom(size)
    blob = seal(keystore, data)
    assert unseal(keystore, blob) == data
    segments = max(1, -(-size // SEG))
    assert len(blob) - size == segments * TAG + (len(blob) - size - segments * TAG)


def test_every_flipped_byte_is_detected(keystore: Keystore) -> None:
    blob = seal(keystore, os.urandom(2 * SEG + 100))
    for pos in range(0, len(blob), 97):  # header, every segment, tags
        bad = bytearray(blob)
        bad[pos] ^= 0x01
        with pytest.raises(IntegrityError):
            unseal(keystore, bytes(bad))


def test_truncation_append_and_reorder_are_detected(keystore: Keystore) -> None:
    data = os.urandom(3 * SEG)
    blob = seal(keystore, data)
    header_len = len(blob) - 3 * (SEG + TAG)
    seg = [
        blob[header_len + i * (SEG + TAG) : header_len + (i + 1) * (SEG + TAG)] for i in range(3)
    ]
    head = blob[:header_len]
    cases = {
        "cut at a segment boundary": head + seg[0] + seg[1],
        "cut inside a segment": blob[:-5],
        "header only": head,
        "appended bytes": blob + b"\x00",
        "appended segment": blob + seg[2],
        "reordered": head + seg[1] + seg[0] + seg[2],
        "dropped middle": head + seg[0] + seg[2],
    }
    for name, bad in cases.items():
        with pytest.raises(IntegrityError):
            unseal(keystore, bad)
        assert name  # each case above must raise


def test_header_swapped_between_objects_is_detected(keystore: Keystore) -> None:
    a, b = seal(keystore, b"a" * 100), seal(keystore, b"b" * 100)
    header_len = len(a) - (100 + TAG)
    with pytest.raises(IntegrityError):
        unseal(keystore, b[:header_len] + a[header_len:])


def test_header_fields_are_validated(keystore: Keystore) -> None:
    blob = seal(keystore, b"x")
    with pytest.raises(IntegrityError, match="bad magic"):
        unseal(keystore, b"NOPE" + blob[4:])
    with pytest.raises(IntegrityError, match="version"):
        unseal(keystore, blob[:4] + b"\x09" + blob[5:])
    with pytest.raises(IntegrityError, match="segment size"):
        unseal(keystore, blob[:5] + struct.pack(">I", 0) + blob[9:])


def test_vault_put_open_verify(tmp_path: Path, keystore: Keystore) -> None:
    vault = Vault(Location((tmp_path / "v").as_uri()), keystore, segment_size=SEG)
    key_id, _ = keystore.create()
    data = os.urandom(10 * SEG + 3)
    sealed = vault.put("ab/obj.dvlt", io.BytesIO(data), key_id)
    vault.verify("ab/obj.dvlt", sealed)
    with vault.open("ab/obj.dvlt") as reader:
        assert reader.read(10) + reader.read() == data
    assert vault.key_id("ab/obj.dvlt") == key_id


class _Zeros(io.RawIOBase):
    """A large stream generated on the fly (never held in memory)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self.left)
        buffer[:n] = b"\x5a" * n
        self.left -= n
        return n


class _Sink(io.RawIOBase):
    def __init__(self) -> None:
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.size += len(data)
        return len(data)


def test_memory_stays_bounded_on_a_200mb_stream(tmp_path: Path, keystore: Keystore) -> None:
    size = 200 * 1024 * 1024
    vault = Vault(Location((tmp_path / "v").as_uri()), keystore)  # 1 MiB segments
    key_id, _ = keystore.create()
    tracemalloc.start()
    try:
        sealed = vault.put("big/obj.dvlt", io.BufferedReader(_Zeros(size)), key_id)
        _, peak_encrypt = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        total = 0
        with vault.open("big/obj.dvlt") as reader:
            while chunk := reader.read(1024 * 1024):
                total += len(chunk)
        _, peak_decrypt = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sealed.plaintext_bytes == size and total == size
    # A few segments in flight at most, never the object.
    assert peak_encrypt < 16 * 1024 * 1024, peak_encrypt
    assert peak_decrypt < 16 * 1024 * 1024, peak_decrypt
