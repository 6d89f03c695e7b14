"""Ingest throughput with 1 and 2 worker processes, on the embedded DuckDB catalog and on
DuckLake (metadata in a real PostgreSQL on loopback, Parquet on moto's S3), same run.

    python benchmarks/scaleout.py            # 4,000 files in 400 drops
    python benchmarks/scaleout.py --quick    # 200 files, what CI runs to keep this working

Each worker is its own process (as a Prefect process worker runs each flow run),
takes its share of the drops with ``--shard``'s rule (``dropvault.tasks.drops.in_shard``) and
runs the ingest batches; all start together once their catalog is open, and the
run's time is the slowest worker's. Ratios are against one worker on DuckDB. The
vault is a local folder in every run, so only the catalog and the worker count vary.
Not a timed test: the machines are shared, so only the ratios mean something.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
import uuid
from multiprocessing.synchronize import Barrier
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/postgres.py

from dropvault.flows.settings import quiet_prefect_defaults  # noqa: E402

quiet_prefect_defaults()

import boto3  # noqa: E402
from ingest import make_files, spawn_workers, write_tree  # noqa: E402

from dropvault.storage.catalog import Catalog  # noqa: E402
from dropvault.storage.ducklake import Lake  # noqa: E402
from dropvault.storage.home import Home  # noqa: E402
from dropvault.tasks.drops import scan_drops  # noqa: E402
from dropvault.tasks.ingest import batches, ingest_batch  # noqa: E402
from dropvault.tasks.layout import in_shard  # noqa: E402
from tests.moto_server import moto_server  # noqa: E402
from tests.postgres import PostgresServer  # noqa: E402

BATCH = 500  # the default DROPVAULT_BATCH_FILES
PER_DROP = 10  # many small drops, so the shards come out nearly even


def worker(root: str, lake: Lake | None, shard: str, start: Barrier, out: mp.Queue) -> None:  # type: ignore[type-arg]
    home = Home.init(root)
    if lake:
        home.catalog = Catalog(lake)
    home.catalog.migrate()  # opens the lake: outside the timing, once per worker
    drops = [
        d
        for d in scan_drops(home.drops, home.pepper, time.time(), 0, 86400)
        if in_shard(d.key, shard)
    ]
    work = [(d, f) for d in drops for f in d.files]
    start.wait()
    started = time.perf_counter()
    ingested = 0
    for chunk in batches(work, BATCH, 256 * 1024**2):
        ingested += ingest_batch(home, chunk, max_file_bytes=10**9).ingested
    out.put((time.perf_counter() - started, ingested))


def run(tmp: Path, files: list[tuple[str, bytes]], lake: Lake | None, workers: int) -> float:
    root = tmp / uuid.uuid4().hex[:8]
    home = Home.init(root)  # makes the keys the workers share
    write_tree(root / "drops", files)
    if lake:
        home.catalog = Catalog(lake)
    home.catalog.migrate()
    home.catalog.close()
    results = spawn_workers(worker, [(str(root), lake, f"{i}/{workers}") for i in range(workers)])
    check = Catalog(lake) if lake else Catalog(root / "catalog.duckdb")
    rows = check.query("SELECT count(*) AS n, count(DISTINCT sop_instance_uid) AS u FROM instances")
    check.close()
    assert rows["n"][0] == rows["u"][0] == len(files) == sum(r[1] for r in results), rows
    return max(r[0] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=4000, help="number of files")
    parser.add_argument("--quick", action="store_true", help="200 files (CI)")
    args = parser.parse_args()
    n = 200 if args.quick else args.n
    files = make_files(n, per_drop=PER_DROP)
    os.environ.pop("AWS_PROFILE", None)
    table = []
    with (
        moto_server() as endpoint,
        PostgresServer.start() as pg,
        tempfile.TemporaryDirectory(prefix="dv-scale-") as t,
    ):
        boto3.client(
            "s3", endpoint_url=endpoint, aws_access_key_id="foo", aws_secret_access_key="foo",  # noqa: S106
            region_name="us-east-1",
        ).create_bucket(Bucket="lake")  # fmt: skip
        s3 = {"endpoint_url": endpoint, "key": "foo", "secret": "foo"}
        tmp = Path(t)

        def lake() -> Lake:
            name = "b" + uuid.uuid4().hex[:10]
            return Lake(pg.conninfo, f"s3://lake/{name}/", s3=s3, schema=name)

        for backend in ("duckdb", "ducklake"):
            for workers in (1, 2):
                seconds = run(tmp, files, lake() if backend == "ducklake" else None, workers)
                table.append((backend, workers, n / seconds))
                print(f"  {backend} x{workers}: {n / seconds:.0f} files/s", file=sys.stderr)
    base = table[0][2]
    print(f"files: {n}  drops: {n // PER_DROP}  batch: {BATCH}  cores: {os.cpu_count()}")
    print(f"{'catalog':<10}{'workers':>8}{'files/s':>10}{'vs DuckDB x1':>14}")
    for backend, workers, fps in table:
        print(f"{backend:<10}{workers:>8}{fps:>10.0f}{fps / base:>14.2f}")


if __name__ == "__main__":
    main()
