"""Ingest on moto's S3 server against a plain s3fs copy of the same objects, in one run.

    python benchmarks/ingest_s3.py            # 500 files
    python benchmarks/ingest_s3.py --quick    # 50 files, what CI runs

moto runs in a process of its own on 127.0.0.1, so both sides pay the same emulated S3. The copy
reads each object with s3fs and writes it under another prefix; dropvault ingests the
same objects (drops, vault and quarantine on S3; catalog and keys on local disk). The
issue asks for the ratio to be reported; there is no goal.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/moto_server.py

from dropvault.flows.settings import Settings, quiet_prefect_defaults

quiet_prefect_defaults()  # before Prefect is imported

import s3fs  # noqa: E402

from dropvault.flows.ingest import ingest_drops  # noqa: E402
from dropvault.storage.catalog import Catalog  # noqa: E402
from dropvault.storage.home import LOCATIONS, Home  # noqa: E402
from dropvault.storage.keystore import Keystore, create_secret  # noqa: E402
from dropvault.storage.locations import Location  # noqa: E402
from dropvault.tasks import samples  # noqa: E402
from tests.moto_server import moto_server  # noqa: E402

BUCKET = "bench"


def s3_home(fs: s3fs.S3FileSystem, prefix: str, local: Path) -> Home:
    locations = {name: Location(f"s3://{BUCKET}/{prefix}/{name}", fs=fs) for name in LOCATIONS}
    return Home(
        catalog=Catalog(local / "catalog.duckdb"),
        keystore=Keystore.create_local(local / "keys"),
        pepper=create_secret(local / "keys" / "pepper.key"),
        region="bench",
        **locations,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=500, help="number of files")
    parser.add_argument("--quick", action="store_true", help="50 files (CI)")
    args = parser.parse_args()
    n = 50 if args.quick else args.n
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(var, "bench")
    os.environ.pop("AWS_PROFILE", None)
    with moto_server() as endpoint:
        fs = s3fs.S3FileSystem(
            endpoint_url=endpoint,
            key="bench",
            secret="bench",  # noqa: S106 - moto's throwaway credentials
            use_listings_cache=False,
            skip_instance_cache=True,
        )
        fs.mkdir(BUCKET)
        rng = random.Random(1)
        files: dict[str, bytes] = {}
        drop = 0
        while len(files) < n:
            _, study = samples.make_study(
                rng, samples.make_patient(rng, drop), min(50, n - len(files)), "CT_small.dcm"
            )
            files |= {f"fac/d{drop:04d}/{k}": v for k, v in study.items()}
            drop += 1
        for name, data in files.items():
            fs.pipe_file(f"{BUCKET}/source/{name}", data)
            fs.pipe_file(f"{BUCKET}/run/drops/{name}", data)
        total = sum(len(d) for d in files.values())

        started = time.perf_counter()
        for name in files:
            fs.pipe_file(f"{BUCKET}/copy/{name}", fs.cat_file(f"{BUCKET}/source/{name}"))
        copy_s = time.perf_counter() - started

        with tempfile.TemporaryDirectory(prefix="dv-bench-s3-") as tmp:
            warm = s3_home(fs, "warm", Path(tmp) / "warm")
            ingest_drops(home=warm, settings=Settings.load(quiet_seconds=0))
            home = s3_home(fs, "run", Path(tmp) / "run")
            started = time.perf_counter()
            stats = ingest_drops(home=home, settings=Settings.load(quiet_seconds=0))
            ingest_s = time.perf_counter() - started
            assert stats.ingested == n, stats.as_dict()
    mb = total / 1e6
    print(f"files: {n}  bytes: {total:,}  S3: moto on 127.0.0.1  cores: {os.cpu_count()}")
    print(f"{'run':<20}{'files/s':>10}{'MB/s':>8}")
    print(f"{'plain s3fs copy':<20}{n / copy_s:>10.0f}{mb / copy_s:>8.1f}")
    print(f"{'dropvault ingest':<20}{n / ingest_s:>10.0f}{mb / ingest_s:>8.1f}")
    print(f"ratio ingest / plain s3fs copy: {copy_s / ingest_s:.3f}")


if __name__ == "__main__":
    main()
