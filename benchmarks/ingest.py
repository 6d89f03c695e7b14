"""Ingest throughput against a plain fsspec copy of the same files, measured in the same run.

    python benchmarks/ingest.py            # 2,000 files (~39 kB CT samples)
    python benchmarks/ingest.py -n 10000   # the headline figure
    python benchmarks/ingest.py --quick    # 200 files, what CI runs to keep this working
    python benchmarks/ingest.py --workers 2   # also: 2 worker processes, one Prefect server
    python benchmarks/ingest.py --archive zip # also: the same files packed in ZIPs of 500

The baseline copies every file with ``fsspec`` ``cp_file`` from one local folder
to another. ``--workers N`` adds a run of N worker processes on one Prefect server
(a real ``prefect server start``), each running the ``ingest_drops`` flow on its
``shard`` of the same drops, as N process workers on one work pool would; its time
is from the common start to the slowest worker's end.

dropvault runs the ``ingest_drops`` flow on identical drops: header parse and
validation, SHA-256, AES-256-GCM encryption, read-back verification, a DuckDB
commit per batch and source removal. Not a timed test: the machines
are shared, so only the ratio means something.

``--archive zip`` (or ``tgz``) also ingests the same files packed in archives of 500 (one
drop each, into a fresh home): the ratio to the plain-file ingest of the same run is what
unpacking costs.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import fsspec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/prefect_server.py

from dropvault.flows.settings import Settings, quiet_prefect_defaults  # noqa: E402

quiet_prefect_defaults()  # before Prefect is imported

from dropvault.flows.ingest import ingest_drops  # noqa: E402
from dropvault.storage.home import Home  # noqa: E402
from dropvault.tasks import samples  # noqa: E402
from tests.prefect_server import prefect_server  # noqa: E402


def make_files(n: int, per_drop: int, seed: int = 1) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    files: list[tuple[str, bytes]] = []
    drop = 0
    while len(files) < n:
        patient = samples.make_patient(rng, drop)
        _, study = samples.make_study(rng, patient, min(per_drop, n - len(files)), "CT_small.dcm")
        files += [(f"fac-{drop % 3}/drop-{drop:05d}/{name}", data) for name, data in study.items()]
        drop += 1
    return files


def write_tree(root: Path, files: list[tuple[str, bytes]]) -> None:
    for name, data in files:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def plain_copy(src: Path, dst: Path) -> float:
    fs = fsspec.filesystem("file")
    started = time.perf_counter()
    for path in sorted(src.rglob("*.dcm")):
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.cp_file(str(path), str(target))
    return time.perf_counter() - started


def encrypt_floor(src: Path, dst: Path) -> float:
    """The least any encrypting ingest must do: read each file, AES-256-GCM it, write it.

    No parse, hash, key wrap, read-back, catalog or source removal. It shows how much of
    the gap to a plain copy is the encryption promise itself rather than our code.
    """
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead = AESGCM(AESGCM.generate_key(bit_length=256))
    started = time.perf_counter()
    for i, path in enumerate(sorted(src.rglob("*.dcm"))):
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        nonce = i.to_bytes(12, "big")
        target.write_bytes(nonce + aead.encrypt(nonce, path.read_bytes(), None))
    return time.perf_counter() - started


def spawn_workers(target: Callable[..., None], args: list[tuple[Any, ...]]) -> list[Any]:
    """Run ``target(*a, start, out)`` in a spawned process for each ``a`` in ``args`` (as a
    Prefect process worker runs a flow run); all pass the ``start`` barrier together. Returns
    what each put on ``out``."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(len(args)), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, start, out)) for a in args]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=3600) for _ in procs]
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"a worker failed (exit code {proc.exitcode})")
    return results


def _flow_worker(root: str, shard: str, start: Barrier, out: mp.Queue) -> None:  # type: ignore[type-arg]
    """One worker process: warm up on an empty home, then run the flow on its shard."""
    warm = Path(root).parent / f"warm-{shard.replace('/', '-')}"
    ingest_drops(home=Home.init(warm), settings=Settings.load(quiet_seconds=0))
    start.wait()
    started = time.perf_counter()
    stats = ingest_drops(
        home=Home.init(Path(root)),
        settings=Settings.load(quiet_seconds=0, home=Path(root)),
        shard=shard,
    )
    out.put((time.perf_counter() - started, stats.ingested))


def ingest_with_workers(root: Path, workers: int) -> tuple[float, int]:
    """Ingest ``root``'s drops with ``workers`` processes on one Prefect server: returns the
    slowest worker's seconds and the files ingested in all."""
    Home.init(root)  # the keys every worker shares, made once before they start
    with prefect_server(root.parent / "prefect-server") as server:
        os.environ["PREFECT_API_URL"] = server["PREFECT_API_URL"]  # spawned workers inherit it
        try:
            shards = [(str(root), f"{i}/{workers}") for i in range(workers)]
            results = spawn_workers(_flow_worker, shards)
        finally:
            del os.environ["PREFECT_API_URL"]
    return max(r[0] for r in results), sum(r[1] for r in results)


def write_archives(root: Path, files: list[tuple[str, bytes]], kind: str, size: int = 500) -> None:
    """The same files, packed ``size`` to an archive, one archive per drop."""
    pack = samples.zip_bytes if kind == "zip" else samples.tar_bytes
    for start in range(0, len(files), size):
        part = dict(files[start : start + size])
        path = root / f"fac-a/packed-{start // size:04d}/part.{kind}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pack(part))


def ingest_archives(root: Path, files: list[tuple[str, bytes]], kind: str) -> float:
    """Seconds to ingest ``files`` packed in archives into a fresh home."""
    home = Home.init(root / "zhome")
    write_archives(root / "zhome" / "drops", files, kind)
    settings = Settings.load(quiet_seconds=0, home=root / "zhome")
    started = time.perf_counter()
    stats = ingest_drops(home=home, settings=settings)
    assert stats.ingested == len(files), stats.as_dict()
    return time.perf_counter() - started


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="number of files")
    parser.add_argument("--per-drop", type=int, default=50, help="files per drop")
    parser.add_argument("--quick", action="store_true", help="200 files (CI)")
    parser.add_argument("--workers", type=int, default=1, help="also run N worker processes")
    parser.add_argument("--archive", choices=["zip", "tgz"], help="also ingest them packed")
    args = parser.parse_args()
    n = 200 if args.quick else args.n
    files = make_files(n, args.per_drop)
    total_bytes = sum(len(d) for _, d in files)
    with tempfile.TemporaryDirectory(prefix="dv-bench-") as tmp:
        root = Path(tmp)
        write_tree(root / "source", files)
        # The copy is cheap and noisy (page-cache writeback): best of three.
        copy_s = min(plain_copy(root / "source", root / f"copy{i}") for i in range(3))
        floor_s = min(encrypt_floor(root / "source", root / f"floor{i}") for i in range(3))
        # Warm-up on an empty home: starts Prefect's embedded server outside the timing.
        ingest_drops(home=Home.init(root / "empty"), settings=Settings.load(quiet_seconds=0))
        home = Home.init(root / "home")
        shutil.copytree(root / "source", root / "home" / "drops", dirs_exist_ok=True)
        settings = Settings.load(quiet_seconds=0, home=root / "home")
        started = time.perf_counter()
        stats = ingest_drops(home=home, settings=settings)
        ingest_s = time.perf_counter() - started
        assert stats.ingested == n, stats.as_dict()
        rss = peak_rss_mb()
        if args.archive:
            archive_s = ingest_archives(root, files, args.archive)
            archive_rss = peak_rss_mb()
        if args.workers > 1:
            shutil.copytree(root / "source", root / "multi" / "drops")
            multi_s, ingested = ingest_with_workers(root / "multi", args.workers)
            assert ingested == n, ingested
    mb = total_bytes / 1e6
    rows = [
        ("plain fsspec copy", n / copy_s, mb / copy_s),
        ("encrypt-only floor", n / floor_s, mb / floor_s),
        ("dropvault ingest", n / ingest_s, mb / ingest_s),
    ]
    if args.archive:
        rows.append((f"ingest from {args.archive}", n / archive_s, mb / archive_s))
    if args.workers > 1:
        rows.append((f"dropvault x{args.workers} workers", n / multi_s, mb / multi_s))
    print(f"files: {n}  bytes: {total_bytes:,}  cores: {os.cpu_count()}")
    print(f"{'run':<20}{'files/s':>12}{'MB/s':>10}")
    for name, fps, mbps in rows:
        print(f"{name:<20}{fps:>12.0f}{mbps:>10.1f}")
    print(f"ratio encrypt-only floor / plain copy: {copy_s / floor_s:.3f}")
    print(f"ratio ingest / plain copy: {copy_s / ingest_s:.3f}  (goal >= 0.6)")
    if args.workers > 1:
        print(f"ratio ingest x{args.workers} workers / plain copy: {copy_s / multi_s:.3f}")
    print(f"peak RSS (one worker): {rss:.0f} MB")
    if args.archive:
        print(f"ratio ingest from {args.archive} / plain-file ingest: {ingest_s / archive_s:.3f}")
        print(f"peak RSS after the {args.archive} ingest: {archive_rss:.0f} MB")


if __name__ == "__main__":
    main()
