"""Sharding drops between workers (``--shard i/n``)."""

from __future__ import annotations

import pytest

from dropvault.tasks.drops import in_shard, parse_shard


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
