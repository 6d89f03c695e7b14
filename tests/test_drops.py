"""Sharding drops between workers (``--shard i/n``)."""

from __future__ import annotations

import json
import time
import tracemalloc
from pathlib import Path

import pytest

from dropvault.storage.locations import Location
from dropvault.tasks.drops import scan_drops
from dropvault.tasks.layout import in_shard, parse_shard


def test_every_drop_goes_to_exactly_one_shard() -> None:
    keys = [f"fac-{i % 7}/drop-{i}" for i in range(3000)]
    for n in (1, 2, 3, 5):
        owners = [[i for i in range(n) if in_shard(k, f"{i}/{n}")] for k in keys]
        assert all(len(o) == 1 for o in owners)
        sizes = [sum(1 for o in owners if o == [i]) for i in range(n)]
        assert min(sizes) > len(keys) / n * 0.85  # roughly even
    assert all(in_shard(k, None) for k in keys)


@pytest.mark.parametrize("bad", ["2/2", "-1/2", "0/0", "a/b", "1", "0/2/3", ""])
def test_a_bad_shard_is_refused_with_its_value(bad: str) -> None:
    with pytest.raises(ValueError, match="shard"):
        parse_shard(bad)


def _manifest(files: int) -> bytes:
    """A drop manifest as facilities write it, listing ``files`` files."""
    entries = [
        {"path": f"series-{i // 500}/IM{i:06d}.dcm", "size": 524_288 + i, "sha256": f"{i:064x}"}
        for i in range(files)
    ]
    return json.dumps({"files": entries}).encode()


@pytest.mark.parametrize(
    "raw",
    [
        b'{"files":[' + b"{}," * (8 << 20 // 3) + b"{}]}",
        b'{"files":[' + b"[]," * (3 << 20) + b"[]]}",
    ],
    ids=["8 MiB of empty objects", "9 MiB of empty lists"],
)
def test_a_manifest_dense_in_values_is_malformed_without_a_parse(
    tmp_path: Path, raw: bytes
) -> None:
    """A manifest is parsed every scan while its drop waits: 8 MiB of "{}," once cost
    320 MB each time. It is judged malformed (the drop waits, then is incomplete) before
    json builds an object per value; a real manifest of 100,000 files still reads."""
    drops = Location(str(tmp_path / "drops"))
    drops.put_bytes("fac/d1/manifest.json", raw)
    drops.put_bytes("fac/d2/manifest.json", _manifest(100_000))
    tracemalloc.start()
    try:
        found = scan_drops(drops, b"p" * 32, time.time(), 0, 3600)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    why = {d.folder: (d.state, d.why) for d in found}
    assert why["fac/d1"] == ("waiting", "manifest is malformed (ValueError)")
    assert why["fac/d2"] == ("waiting", "100000 listed file(s) missing or short")
    assert peak < 96 << 20  # the real manifest's 100,000 entries, not the hostile one
