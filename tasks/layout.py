"""The layout the flows keep inside a home's locations, and the pending work it shows.

Kept free of Prefect (importing it costs about a second): the CLI reads it to answer an
ingest pass with nothing to do without starting Prefect at all.
"""

from __future__ import annotations

import hashlib

import duckdb

from dropvault.storage.home import Home

# {drops}/<facility>/_receipts/: what each drop became, written for the facility.
RECEIPTS = "_receipts"
# {vault}/.pending/: the records of writes a batch has not cataloged yet.
PENDING = ".pending"
# Drops of a catalog made before keyed ids (their plain folder names), to re-key.
LEGACY = (
    "SELECT DISTINCT facility_id, drop_id FROM ("
    " SELECT facility_id, drop_id FROM drops UNION ALL"
    " SELECT facility_id, drop_id FROM instances UNION ALL"
    " SELECT facility_id, drop_id FROM quarantine)"
    " WHERE NOT regexp_full_match(drop_id, 'd_[0-9a-f]{24}')"
)


def ingest_has_work(home: Home) -> bool:
    """Whether an ingest pass would do anything: a file in the drop zone besides the
    facilities' receipts (a waiting drop counts: its receipt is rewritten), a record a
    stopped batch left to settle, or drops of an older catalog to re-key. The embedded
    CLI answers a pass with none without starting Prefect's temporary server (5-10 s)."""
    if any(e.name.split("/")[1:2] != [RECEIPTS] for e in home.drops.list()):
        return True
    if home.vault.list(PENDING):
        return True
    try:
        return not home.catalog.query(LEGACY).empty
    except duckdb.Error:
        return True  # a catalog not made yet: the flow makes it


def parse_shard(shard: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)``: this worker takes the i-th of n shares of the drops."""
    try:
        i, n = (int(p) for p in shard.split("/"))
    except ValueError:
        raise ValueError(f"shard must look like 'i/n' (e.g. 0/2), not {shard!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"shard {shard!r}: need 0 <= i < n")
    return i, n


def in_shard(drop_key: str, shard: str | None) -> bool:
    """Whether a drop belongs to ``shard``, by a stable hash of its key: workers that run
    with 0/n ... n-1/n split the drops between them, each drop to exactly one."""
    if shard is None:
        return True
    i, n = parse_shard(shard)
    digest = hashlib.blake2b(drop_key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n == i
