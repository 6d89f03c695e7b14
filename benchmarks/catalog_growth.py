"""Ingest as the catalog grows: does a batch cost more when the catalog already holds a
million images? Measured against the same ingest into an empty catalog, in the same run.

    python benchmarks/catalog_growth.py            # catalogs of 0, 250,000 and 1,000,000 images
    python benchmarks/catalog_growth.py --quick    # 0 and 20,000 (CI)

For each size, a catalog is filled with that many synthetic image rows (``instances`` and
``objects``, one study per 50 images, as an ingest would leave them), then the plain
``ingest_batch`` function (no Prefect) ingests 2,000 small CT files in batches of
500. Two schemas run side by side: the current one, and the one before migration 008, whose
per-image tables kept a PRIMARY KEY (an ART index that DuckDB rewrites whole at every
checkpoint, so at every commit). The baseline is the current schema on an empty catalog.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ingest.py

from ingest import make_files, write_tree  # noqa: E402

from dropvault.storage.catalog import Catalog, migrations  # noqa: E402
from dropvault.storage.home import Home  # noqa: E402
from dropvault.tasks.drops import scan_drops  # noqa: E402
from dropvault.tasks.ingest import batches, ingest_batch  # noqa: E402
from dropvault.tasks.reconcile import reconcile_vault, settle_pending  # noqa: E402

LEGACY_AFTER = 7  # the last migration before 008 dropped the per-image indexes


def legacy_catalog(path: Path) -> Catalog:
    """A catalog without 008 (the tables as they were before it), every other migration
    applied, and 008 stamped as applied."""
    with duckdb.connect(str(path)) as con:
        con.execute(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name VARCHAR,"
            " applied_at TIMESTAMPTZ)"
        )
        for version, name, sql in migrations():
            if version != LEGACY_AFTER + 1:
                con.execute(sql)
            con.execute("INSERT INTO schema_migrations VALUES (?, ?, now())", [version, name])
    return Catalog(path)


def fill(catalog: Catalog, images: int) -> None:
    """``images`` synthetic rows in ``instances`` and ``objects`` (and their studies)."""
    if not images:
        return
    with duckdb.connect(str(catalog.path)) as con:
        con.execute(
            "INSERT INTO studies (study_uid, patient_key, owner, facility_id, record_key_id,"
            " status, created_at) SELECT '2.25.' || i, md5('p' || i), 'patient:x', 'fac',"
            " 'k' || i, 'active', now() FROM range(?) r(i)",
            [images // 50 + 1],
        )
        con.execute(
            "INSERT INTO objects SELECT md5('o' || i), 'instance', 'file:///vault', 'local',"
            " left(md5('o' || i), 2) || '/' || md5('o' || i) || '.dvlt', 'k' || (i // 50),"
            " 39000, 39100, now() FROM range(?) r(i)",
            [images],
        )
        con.execute(
            "INSERT INTO instances SELECT '2.25.9' || i, '2.25.' || (i // 50), '2.25.8' || i,"
            " '1.2.840.10008.5.1.4.1.1.2', 'CT', '1.2.840.10008.1.2.1', 128, 128, 1, 'fac',"
            " 'd' || (i // 50), md5('o' || i), sha256('s' || i), 39000, now() FROM range(?) r(i)",
            [images],
        )


def reconcile_before(home: Home) -> int:
    """What every ingest run did at its end before pending records: list the whole vault and
    load every ``objects`` row to find the orphans (read-only here: nothing is removed)."""
    rows = home.catalog.query("SELECT kind, location_url, name FROM objects")
    known = set(rows.loc[rows["kind"] == "instance", "name"])
    return sum(e.name not in known for e in home.vault.list())


def run(
    root: Path, images: int, legacy: bool, files: list[tuple[str, bytes]]
) -> tuple[float, float, float, float]:
    """Files/s of the ingest, then the seconds of the run-end reconcile (pending records
    only), of the run-end reconcile as it was before, and of the daily full pass, on the
    vault and catalog the ingest left."""
    home = Home.init(root)
    if legacy:
        home.catalog = legacy_catalog(root / "legacy.duckdb")
    home.catalog.migrate()
    fill(home.catalog, images)
    write_tree(root / "drops", files)
    drops = scan_drops(home.drops, home.pepper, time.time() + 3600, 0, 86400, home.catalog)
    work = [(d, f) for d in drops for f in d.files]
    started = time.perf_counter()
    ingested = 0
    for chunk in batches(work, 500, 256 * 1024**2):
        ingested += ingest_batch(home, chunk, max_file_bytes=1 << 30).ingested
    seconds = time.perf_counter() - started
    if ingested != len(files):
        raise RuntimeError(f"ingested {ingested} of {len(files)}")
    started = time.perf_counter()
    settle_pending(home, 3600)
    settle_s = time.perf_counter() - started
    started = time.perf_counter()
    reconcile_before(home)
    before_s = time.perf_counter() - started
    started = time.perf_counter()
    reconcile_vault(home, 3600)
    return len(files) / seconds, settle_s, before_s, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("-n", type=int, default=2000, help="files ingested at each size")
    args = parser.parse_args()
    sizes = [0, 20_000] if args.quick else [0, 250_000, 1_000_000]
    n = 200 if args.quick else args.n
    random.seed(3)
    results: dict[tuple[int, bool], tuple[float, float, float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="dv-growth-") as tmp:
        run(Path(tmp) / "warm-up", 0, False, make_files(50, 50, seed=99))  # imports, caches
        for size in sizes:
            for legacy in (False, True):
                files = make_files(n, 50, seed=size + legacy)
                root = Path(tmp) / f"{size}-{'legacy' if legacy else 'now'}"
                results[size, legacy] = run(root, size, legacy, files)
    base = results[0, False][0]
    print(f"files ingested at each size: {n}  (batches of 500, no Prefect)")
    head = ("images in catalog", "files/s", "x empty", "before 008", "x empty")
    print(f"{head[0]:>18} {head[1]:>9} {head[2]:>8} {head[3]:>11} {head[4]:>8}")
    for size in sizes:
        now, old = results[size, False][0], results[size, True][0]
        print(f"{size:>18,} {now:>9.0f} {now / base:>8.2f} {old:>11.0f} {old / base:>8.2f}")
    print("\nreconcile at the end of a run (current schema), ms: pending records only; as")
    print("each run did before (whole vault listed, every objects row loaded); daily full pass")
    print(f"{'images in catalog':>18} {'pending':>9} {'before':>9} {'full pass':>10}")
    for size in sizes:
        _, settle_s, before_s, full_s = results[size, False]
        print(f"{size:>18,} {settle_s * 1e3:>9.1f} {before_s * 1e3:>9.1f} {full_s * 1e3:>10.1f}")


if __name__ == "__main__":
    main()
