"""``access_list(owner)`` latency with 1 M grants in the catalog, against a pandas baseline.

    python benchmarks/access_list.py             # 1,000,000 grants, 200 look-ups
    python benchmarks/access_list.py --quick     # 50,000 grants (CI)

Prints p50/p95 for three readings of the same question, all in one run:
* ``access_list()`` as a notebook calls it: open read-only, query, copy to pandas, close;
* the same query on an already open read-only connection (the query's own cost);
* the pandas baseline: filter a DataFrame of every grant already in memory.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import duckdb

from dropvault.storage.catalog import Catalog
from dropvault.tasks.sharing import access_list

QUERY = (
    "SELECT owner, grantee, scope, study_uid, granted_at, expires_at, status"
    " FROM access_list WHERE owner = ? ORDER BY grantee, study_uid"
)


def fill(catalog: Catalog, grants: int, owners: int) -> None:
    catalog.migrate()
    with duckdb.connect(str(catalog.path)) as con:
        con.execute(
            """
            INSERT INTO grants
            SELECT 'user:' || (i % ?) AS owner,
                   'grantee:' || (i // ?) AS grantee,
                   '1.2.826.0.1.' || i AS study_uid,
                   'r' || i, TIMESTAMPTZ '2026-01-01' + to_minutes(i % 100000),
                   CASE WHEN i % 7 = 0 THEN TIMESTAMPTZ '2026-06-01' END,
                   CASE WHEN i % 5 = 0 THEN TIMESTAMPTZ '2026-03-01' END,
                   NULL, NULL, NULL
            FROM range(?) t(i)
            """,
            [owners, owners, grants],
        )
        con.execute("CHECKPOINT")


def pct(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=100)[int(q) - 1] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grants", type=int, default=1_000_000)
    parser.add_argument("--owners", type=int, default=50_000)
    parser.add_argument("--lookups", type=int, default=200)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    grants = 50_000 if args.quick else args.grants
    owners = min(args.owners, grants // 4)
    rng = random.Random(3)
    with tempfile.TemporaryDirectory(prefix="dv-acl-") as tmp:
        catalog = Catalog(Path(tmp) / "catalog.duckdb")
        started = time.perf_counter()
        fill(catalog, grants, owners)
        took = time.perf_counter() - started
        print(f"filled {grants:,} grants for {owners:,} owners in {took:.1f} s")
        picks = [f"user:{rng.randrange(owners)}" for _ in range(args.lookups)]

        full = []
        for owner in picks:
            t = time.perf_counter()
            df = access_list(catalog, owner)
            full.append(time.perf_counter() - t)
            assert len(df) > 0
        with duckdb.connect(str(catalog.path), read_only=True) as con:
            every = con.execute("SELECT * FROM access_list").df()
            warm = []
            for owner in picks:
                t = time.perf_counter()
                con.execute(QUERY, [owner]).df()
                warm.append(time.perf_counter() - t)
        base = []
        for owner in picks:
            t = time.perf_counter()
            every[every["owner"] == owner].sort_values(["grantee", "study_uid"])
            base.append(time.perf_counter() - t)
    print(f"{'reading':<44}{'p50 ms':>10}{'p95 ms':>10}")
    for name, samples in (
        ("access_list() (open, query, close)", full),
        ("query on an open read-only connection", warm),
        ("pandas filter of all grants in memory", base),
    ):
        print(f"{name:<44}{pct(samples, 50):>10.2f}{pct(samples, 95):>10.2f}")
    ratio = statistics.median(base) / statistics.median(warm)
    print(f"goal: p50 <= 5 ms; pandas / query time ratio {ratio:.2f}x")


if __name__ == "__main__":
    main()
