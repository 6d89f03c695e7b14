"""Tamper with cataloged vault objects on disk, then export through the real path: every
flip, truncation, reordering, header swap and object substitution is detected, and the
export returns nothing (no output file, no partial plaintext)."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest

from dropvault.flows.ingest import ingest_drops
from dropvault.flows.settings import Settings
from dropvault.storage.home import Home
from dropvault.storage.vault import DEFAULT_SEGMENT, TAG, Header, IntegrityError
from dropvault.tasks import samples
from dropvault.tasks.exports import ExportError, export_instance

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tampered_home(tmp_path_factory: pytest.TempPathFactory) -> tuple[Home, list[tuple[str, str]]]:
    """Two small studies and one 12 MB image (13 segments), ingested; ``(uid, object path)``."""
    root = tmp_path_factory.mktemp("tamper")
    home = Home.init(root / "home")
    rng = random.Random(31)
    for i in range(2):
        uid, files = samples.make_study(rng, samples.make_patient(rng, i), 1, "MR_small.dcm")
        samples.write_drop(home.drops, "fac", f"d{i}", files)
    big = io.BytesIO()
    samples.write_multiframe(
        big, samples.make_patient(rng, 5), "1.2.826.0.1.3680043.8.498.31", "1.2.3", 24
    )
    home.drops.put_bytes("fac/big/big.dcm", big.getvalue())
    ingest_drops(home=home, settings=Settings.load(quiet_seconds=0))
    rows = home.catalog.query(
        "SELECT i.sop_instance_uid, o.name FROM instances i JOIN objects o USING (object_id)"
        " ORDER BY i.size_bytes"
    )
    objects = [(u, home.vault.path(n)) for u, n in rows.itertuples(index=False)]
    return home, objects


def export_fails(home: Home, uid: str, out: Path) -> None:
    with pytest.raises(ExportError):
        export_instance(home, uid, out)
    assert not out.exists()
    assert [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []


def tampered(path: str, blob: bytes) -> object:
    """Write ``blob`` over the object for the ``with`` block, then restore it."""

    class Swap:
        def __enter__(self) -> None:
            self.original = Path(path).read_bytes()
            Path(path).write_bytes(blob)

        def __exit__(self, *exc: object) -> None:
            Path(path).write_bytes(self.original)

    return Swap()


def test_untampered_objects_export(
    tampered_home: tuple[Home, list[tuple[str, str]]], tmp_path: Path
) -> None:
    home, objects = tampered_home
    for uid, _ in objects:
        export_instance(home, uid, tmp_path / f"{uid}.dcm")
    assert len(list(tmp_path.glob("*.dcm"))) == 3


def test_every_flipped_byte_is_detected(tampered_home: tuple[Home, list[tuple[str, str]]]) -> None:
    """Every byte of a small object, flipped one at a time, read through the vault."""
    home, objects = tampered_home
    _, path = objects[0]
    blob = Path(path).read_bytes()
    vault = home.vault_store()
    name = home.vault.relative(path)
    for pos in range(len(blob)):
        bad = bytearray(blob)
        bad[pos] ^= 1 << (pos % 8)
        with tampered(path, bytes(bad)), pytest.raises(IntegrityError):
            vault.digest(name)
    assert vault.digest(name)[0] > 0


def test_tampered_exports_return_nothing(
    tampered_home: tuple[Home, list[tuple[str, str]]], tmp_path: Path
) -> None:
    home, objects = tampered_home
    (small_uid, small), (other_uid, other), (big_uid, big) = objects
    big_blob, small_blob, other_blob = (Path(p).read_bytes() for p in (big, small, other))
    head = len(Header.read(io.BytesIO(big_blob)).raw)
    seg = DEFAULT_SEGMENT + TAG
    segments = [big_blob[i : i + seg] for i in range(head, len(big_blob), seg)]
    assert len(segments) >= 12
    rng = random.Random(5)
    cases: dict[str, tuple[str, str, bytes]] = {}
    for pos in sorted(rng.sample(range(len(big_blob)), 20)) + [
        0,
        5,
        head - 1,
        head,
        len(big_blob) - 1,
    ]:
        flipped = bytearray(big_blob)
        flipped[pos] ^= 0x80
        cases[f"flip {pos}"] = (big_uid, big, bytes(flipped))
    for k in (1, 6, len(segments) - 1):
        cases[f"cut after segment {k}"] = (big_uid, big, big_blob[: head + k * seg])
    cases["cut inside the last segment"] = (big_uid, big, big_blob[:-7])
    cases["header only"] = (big_uid, big, big_blob[:head])
    cases["appended byte"] = (big_uid, big, big_blob + b"\0")
    cases["segments 2 and 3 swapped"] = (
        big_uid,
        big,
        big_blob[:head] + b"".join(segments[:2] + [segments[3], segments[2]] + segments[4:]),
    )
    cases["last segment dropped"] = (big_uid, big, big_blob[:head] + b"".join(segments[:-1]))
    small_head = len(Header.read(io.BytesIO(small_blob)).raw)
    other_head = len(Header.read(io.BytesIO(other_blob)).raw)
    cases["header swapped from another object"] = (
        small_uid,
        small,
        other_blob[:other_head] + small_blob[small_head:],
    )
    cases["whole object substituted by another"] = (small_uid, small, other_blob)
    for label, (uid, path, blob) in cases.items():
        with tampered(path, blob):
            export_fails(home, uid, tmp_path / "out.dcm")
        assert label
    export_instance(home, big_uid, tmp_path / "fine.dcm")  # restored: exports again
    assert len(cases) >= 30
