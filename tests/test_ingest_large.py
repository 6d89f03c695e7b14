"""Large images (over the in-memory limit): hashed as they are encrypted, one read of the
source, and every case that needs the hash first (known or repeated UID, rejected header,
manifest checksum, a source changed meanwhile) still decided as for a small file."""

from __future__ import annotations

import hashlib
import io
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from dropvault.storage.home import Home
from dropvault.storage.locations import FullReads
from dropvault.tasks import ingest as ingest_mod
from dropvault.tasks import samples
from dropvault.tasks.drops import scan_drops
from dropvault.tasks.ingest import IN_MEMORY_MAX, IngestStats, ingest_batch
from dropvault.tasks.quarantine import quarantine_export
from tests.helpers import sources


def big_image(seed: int, frames: int = 18) -> bytes:
    """A multi-frame MR image just over the in-memory limit (18 frames: 9.4 MB)."""
    out = io.BytesIO()
    rng = random.Random(seed)
    samples.write_multiframe(
        out,
        samples.make_patient(rng, seed),
        f"1.2.826.0.1.3680043.8.498.{seed + 1}",
        f"1.2.826.0.1.3680043.8.499.{seed + 1}",
        frames,
        seed=seed,
    )
    data = out.getvalue()
    assert len(data) > IN_MEMORY_MAX
    return data


def ingest(home: Home) -> IngestStats:
    """Every ready file of the drops, in one batch."""
    home.catalog.migrate()
    work = [
        (drop, f)
        for drop in scan_drops(home.drops, home.pepper, time.time() + 3600, 0, 86400)
        for f in drop.files
    ]
    return ingest_batch(home, work, max_file_bytes=10**9)


def one(home: Home, sql: str) -> Any:
    return home.catalog.query(sql).iloc[0, 0]


def images_left(home: Home) -> list[str]:
    """Sources still in the drops (a drop's manifest goes when the flow finishes it)."""
    return [e.name for e in sources(home.drops) if e.name.endswith(".dcm")]


def vault_names(home: Home) -> set[str]:
    return {e.name for e in home.vault.list()}


def cataloged_names(home: Home) -> set[str]:
    rows = home.catalog.query("SELECT name FROM objects WHERE kind = 'instance'")
    return set(rows["name"])


class Counting(FullReads):
    """A read handle that counts the bytes read through it."""

    def __init__(self, handle: IO[bytes], tally: list[int]) -> None:
        super().__init__(handle)
        self._tally = tally

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self._tally[0] += len(data)
        return data

    def fileno(self) -> int:
        return self._raw.fileno()


@pytest.fixture
def bytes_read(home: Home, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    tally = [0]
    plain = home.drops.open
    monkeypatch.setattr(home.drops, "open", lambda *a, **k: Counting(plain(*a, **k), tally))
    yield tally


def test_a_large_image_is_read_once_and_stored_whole(home: Home, bytes_read: list[int]) -> None:
    data = big_image(1)
    samples.write_drop(home.drops, "fac", "d1", {"big.dcm": data})
    stats = ingest(home)
    assert (stats.ingested, stats.duplicates, sum(stats.quarantined.values())) == (1, 0, 0)
    sha = hashlib.sha256(data).hexdigest()
    assert one(home, "SELECT sha256 FROM instances") == sha
    (name,) = cataloged_names(home)
    assert home.vault_store().digest(name) == (len(data), sha)
    assert vault_names(home) == {name} and images_left(home) == []
    if home.drops.has_change_tokens:  # local disk, S3: the header, then one pass
        assert bytes_read[0] < len(data) + 2 * 1024 * 1024
    else:  # memory://: nothing tells a changed source, so it is hashed first
        assert bytes_read[0] >= 2 * len(data)


def test_a_known_large_image_is_a_duplicate_and_a_changed_one_a_conflict(
    local_home: Home, tmp_path: Path
) -> None:
    home = local_home
    data = big_image(2)
    samples.write_drop(home.drops, "fac", "d1", {"a.dcm": data})
    assert ingest(home).ingested == 1
    samples.write_drop(home.drops, "fac", "d2", {"again.dcm": data})
    stats = ingest(home)
    assert (stats.ingested, stats.duplicates, stats.files_seen) == (0, 1, 1)
    other = samples.with_uid(data, samples.sop_uid(data), tweak=b"other content")
    samples.write_drop(home.drops, "fac", "d3", {"other.dcm": other})
    stats = ingest(home)
    assert stats.quarantined == {"uid_conflict": 1} and stats.files_seen == 1
    qid = one(home, "SELECT quarantine_id FROM quarantine WHERE reason = 'uid_conflict'")
    quarantine_export(home, str(qid), tmp_path / "q.dcm")
    assert (tmp_path / "q.dcm").read_bytes() == other
    assert one(home, "SELECT count(*) FROM instances") == 1
    assert vault_names(home) == cataloged_names(home) and images_left(home) == []


def test_two_copies_of_a_large_image_in_one_batch(local_home: Home) -> None:
    data = big_image(3)
    samples.write_drop(local_home.drops, "fac", "d1", {"a.dcm": data, "copy/a.dcm": data})
    stats = ingest(local_home)
    assert (stats.ingested, stats.duplicates, stats.files_seen) == (1, 1, 2)
    assert vault_names(local_home) == cataloged_names(local_home)


def test_a_large_image_failing_its_manifest_checksum_leaves_no_object(home: Home) -> None:
    data = big_image(4)
    changed = data[:-1] + bytes([data[-1] ^ 1])  # the manifest describes other bytes
    samples.write_drop(home.drops, "fac", "d1", {"big.dcm": data}, listed={"big.dcm": changed})
    stats = ingest(home)
    assert stats.quarantined == {"checksum_mismatch": 1} and stats.ingested == 0
    assert one(home, "SELECT count(*) FROM instances") == 0
    assert vault_names(home) == set()  # the one-pass object is gone, not left to reconcile


def test_a_large_image_with_a_cut_header_is_quarantined_with_its_bytes(
    local_home: Home, tmp_path: Path
) -> None:
    data = big_image(5)
    cut = data[:400]  # inside the header, then padding past the in-memory limit
    bad = cut + b"\0" * (IN_MEMORY_MAX + 1 - len(cut))
    samples.write_drop(local_home.drops, "fac", "d1", {"bad.dcm": bad}, manifest=False)
    stats = ingest(local_home)
    assert sum(stats.quarantined.values()) == 1 and stats.ingested == 0
    qid = one(local_home, "SELECT quarantine_id FROM quarantine")
    quarantine_export(local_home, str(qid), tmp_path / "q.dcm")
    assert (tmp_path / "q.dcm").read_bytes() == bad
    assert vault_names(local_home) == set()


def pixels_changed(data: bytes) -> bytes:
    """The same header and size, other pixel bytes."""
    return data[:-4096] + bytes(b ^ 0xFF for b in data[-4096:])


@pytest.mark.parametrize(
    ("point", "how"),
    [
        ("after_parse", "other_image_renamed_over"),
        ("after_parse", "other_image_in_place"),
        ("mid_encrypt", "pixels_in_place"),
    ],
)
def test_a_source_changed_after_its_header_was_read_is_never_cataloged_as_it_was(
    local_home: Home, point: str, how: str
) -> None:
    """The file changes after its header was parsed (another patient's image renamed over
    it or written into it; or its pixels rewritten as it is encrypted): no catalog row may
    pair a parsed header with bytes it was not parsed from, nor carry a hash of bytes other
    than those stored."""
    home = local_home
    first = big_image(6)
    second = pixels_changed(first) if how == "pixels_in_place" else big_image(7)
    samples.write_drop(home.drops, "fac", "d1", {"big.dcm": first}, manifest=False)
    path = Path(home.drops.root) / "fac" / "d1" / "big.dcm"
    fired: list[str] = []

    def swap() -> None:
        if fired:
            return
        fired.append(how)
        if how == "other_image_renamed_over":
            staged = path.with_name(".staged")
            staged.write_bytes(second)
            staged.replace(path)
        else:
            with path.open("r+b" if how == "pixels_in_place" else "wb") as fh:
                fh.write(second)

    ingest_mod.FAULTS[point] = swap
    try:
        stats = ingest(home)
    finally:
        ingest_mod.FAULTS.pop(point)
    assert fired
    rows = home.catalog.query("SELECT sop_instance_uid, sha256, object_id FROM instances")
    vault = home.vault_store()
    for uid, sha, object_id in rows.itertuples(index=False):
        with vault.open(vault.object_name(object_id)) as fh:
            stored = fh.read()
        assert hashlib.sha256(stored).hexdigest() == sha
        assert samples.sop_uid(stored) == uid
    if how == "pixels_in_place":  # same header and listed size: the new bytes go in now
        assert stats.ingested == 1
        assert list(rows["sha256"]) == [hashlib.sha256(second).hexdigest()]
    assert vault_names(home) == cataloged_names(home)
