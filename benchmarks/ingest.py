"""Ingest throughput against a plain fsspec copy of the same files, measured in the same run.

    python benchmarks/ingest.py            # 2,000 files (~39 kB CT samples)
    python benchmarks/ingest.py -n 10000   # the headline figure
    python benchmarks/ingest.py --quick    # 200 files, what CI runs to keep this working
    python benchmarks/ingest.py --workers 2   # also: 2 worker processes, one Prefect server
    python benchmarks/ingest.py --archive zip # also: the same files packed in ZIPs of 500
    python benchmarks/ingest.py --server      # also: one flow on a Prefect server (a worker)

The floor (``benchmarks/floors.py``) keeps the same promises with none of our code: read,
SHA-256, AES-256-GCM, write, ``sync`` per 500 files, remove the source. Ratios are against
it; the plain ``fsspec`` ``cp_file`` copy is shown for reference. Copy, floor and the
embedded ingest run in alternation, three rounds each (the machine's cost of creating a file
moves several-fold within minutes, and one unpaired ingest run once read 0.24x against a
floor measured in a faster minute): their medians are used, and each round's own
floor/ingest ratio is printed too.

``--workers N`` adds a run of N worker processes on one Prefect server (a real
``prefect server start``), each running the ``ingest_drops`` flow on its ``shard`` of the
same drops, as N process workers on one work pool would; its time is from the common start
to the slowest worker's end. ``--server`` is the same with one worker.

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
import statistics
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

from benchmarks.floors import fresh_copy, promises_floor  # noqa: E402
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


def ingest_round(home_root: Path, source: Path, n: int) -> float:
    """Seconds for the embedded ``ingest_drops`` flow on a fresh home holding ``source``'s
    drops (the home is removed afterwards)."""
    home = Home.init(home_root)
    shutil.copytree(source, home_root / "drops", dirs_exist_ok=True)
    settings = Settings.load(quiet_seconds=0, home=home_root)
    started = time.perf_counter()
    stats = ingest_drops(home=home, settings=settings)
    seconds = time.perf_counter() - started
    assert stats.ingested == n, stats.as_dict()
    shutil.rmtree(home_root)
    return seconds


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="number of files")
    parser.add_argument("--per-drop", type=int, default=50, help="files per drop")
    parser.add_argument("--quick", action="store_true", help="200 files (CI)")
    parser.add_argument("--workers", type=int, default=1, help="also run N worker processes")
    parser.add_argument("--archive", choices=["zip", "tgz"], help="also ingest them packed")
    parser.add_argument("--server", action="store_true", help="also one flow on a server")
    parser.add_argument("--rounds", type=int, default=3, help="copy/floor rounds (median)")
    args = parser.parse_args()
    n = 200 if args.quick else args.n
    rounds = 1 if args.quick else args.rounds
    files = make_files(n, args.per_drop)
    total_bytes = sum(len(d) for _, d in files)
    with tempfile.TemporaryDirectory(prefix="dv-bench-") as tmp:
        root = Path(tmp)
        write_tree(root / "source", files)
        # Warm-up on an empty home: starts Prefect's embedded server outside the timing.
        ingest_drops(home=Home.init(root / "empty"), settings=Settings.load(quiet_seconds=0))
        copies, floors, ingests = [], [], []
        for i in range(rounds):  # alternating, so all three see the same hour's file costs
            copies.append(plain_copy(root / "source", root / f"copy{i}"))
            shutil.rmtree(root / f"copy{i}")
            src = fresh_copy(root / "source", root / "floor-source")
            floors.append(promises_floor(src, root / f"floor{i}"))
            shutil.rmtree(root / f"floor{i}")
            ingests.append(ingest_round(root / f"home{i}", root / "source", n))
        copy_s, floor_s = statistics.median(copies), statistics.median(floors)
        ingest_s = statistics.median(ingests)
        paired = [f / g for f, g in zip(floors, ingests, strict=True)]
        rss = peak_rss_mb()
        if args.archive:
            archive_s = ingest_archives(root, files, args.archive)
            archive_rss = peak_rss_mb()
        if args.server:
            shutil.copytree(root / "source", root / "one" / "drops")
            server_s, ingested = ingest_with_workers(root / "one", 1)
            assert ingested == n, ingested
        if args.workers > 1:
            shutil.copytree(root / "source", root / "multi" / "drops")
            multi_s, ingested = ingest_with_workers(root / "multi", args.workers)
            assert ingested == n, ingested
    mb = total_bytes / 1e6
    rows = [
        ("plain fsspec copy", copy_s),
        ("same-promises floor", floor_s),
        ("dropvault, embedded", ingest_s),
    ]
    if args.server:
        rows.append(("dropvault, on a server", server_s))
    if args.archive:
        rows.append((f"embedded, from {args.archive}", archive_s))
    if args.workers > 1:
        rows.append((f"dropvault x{args.workers} workers", multi_s))
    print(f"files: {n}  bytes: {total_bytes:,}  cores: {os.cpu_count()}  rounds: {rounds}")
    print(f"{'run':<28}{'seconds':>9}{'files/s':>9}{'MB/s':>8}{'x floor':>9}{'x copy':>8}")
    for name, secs in rows:
        print(
            f"{name:<28}{secs:>9.2f}{n / secs:>9.0f}{mb / secs:>8.1f}"
            f"{floor_s / secs:>9.3f}{copy_s / secs:>8.3f}"
        )
    if args.server:
        print(f"embedded / server time: {ingest_s / server_s:.2f} (goal <= 1.25)")
        print(f"server / floor: {floor_s / server_s:.3f} (goal >= 0.5 on 10,000 files)")
    if rounds > 1:
        shown = ", ".join(f"{r:.3f}" for r in paired)
        print(f"embedded / floor, round by round: {shown}; median {statistics.median(paired):.3f}")
    print(f"peak RSS (one worker): {rss:.0f} MB")
    if args.archive:
        print(f"ratio ingest from {args.archive} / plain-file ingest: {ingest_s / archive_s:.3f}")
        print(f"peak RSS after the {args.archive} ingest: {archive_rss:.0f} MB")


if __name__ == "__main__":
    main()
