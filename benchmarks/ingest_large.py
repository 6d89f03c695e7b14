"""Ingest of large multi-frame images against a plain fsspec copy, with peak memory.

    python benchmarks/ingest_large.py            # 4 files of ~210 MB (400 frames of 512x512x16)
    python benchmarks/ingest_large.py --quick    # 2 files of ~10 MB, what CI runs

The files are generated in a stream (dropvault.tasks.samples.write_multiframe), so nothing here
holds a whole image. The ingest runs in a child process that reports its own peak RSS:
the goal is >= 0.8x the same-promises floor (``benchmarks/floors.py``: read, SHA-256,
AES-256-GCM in 1 MiB segments, write, sync, remove the source, streaming) with peak RSS
<= 300 MB; the plain copy is shown for reference.

The child runs three ways:

- as a deployed worker does, talking to a Prefect server (a real ``prefect server start``);
- embedded, as ``dropvault ingest`` and ``dropvault demo`` run with no server: the command
  starts Prefect's server for itself before it imports the flow
  (``dropvault.flows.home_server.CommandServer``) and the flow is its plain client;
- on Prefect's own temporary server, as a flow called in a notebook with no server runs:
  Prefect starts it from inside the flow's process, which then also loads the server's
  modules (SQLAlchemy, FastAPI, the migrations). For reference.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/prefect_server.py

import fsspec

from benchmarks.floors import promises_floor
from dropvault.tasks import samples
from tests.prefect_server import prefect_server

CHILD = """
import json, resource, shutil, sys, time
from pathlib import Path
from dropvault.flows.settings import Settings, quiet_prefect_defaults
quiet_prefect_defaults()
root = Path(sys.argv[1])
if sys.argv[2] == "embedded":  # what the CLI does before it imports a flow
    from dropvault.flows.cli import flow_server_ready, start_flow_server
    start_flow_server(Settings.load(home=root / "home"))
else:
    flow_server_ready = lambda: None
from dropvault.flows.ingest import ingest_drops
from dropvault.storage.home import Home

flow_server_ready()
ingest_drops(home=Home.init(root / "warm"), settings=Settings.load(quiet_seconds=0))
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
home = Home.init(root / "home")
settings = Settings.load(quiet_seconds=0, home=root / "home")
started = time.perf_counter()
stats = ingest_drops(home=home, settings=settings)
seconds = time.perf_counter() - started
print(json.dumps({
    "seconds": seconds,
    "ingested": stats.ingested,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "baseline_rss_mb": baseline,
}))
"""

MODES = {
    "server": "worker on a Prefect server",
    "embedded": "embedded (the CLI's own server)",
    "temporary": "Prefect's temporary server",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=4, help="number of files")
    parser.add_argument("--frames", type=int, default=400, help="512x512 frames per file")
    parser.add_argument("--quick", action="store_true", help="2 files of 20 frames (CI)")
    args = parser.parse_args()
    n, frames = (2, 20) if args.quick else (args.n, args.frames)
    with tempfile.TemporaryDirectory(prefix="dv-bench-large-") as tmp:
        root = Path(tmp)
        source = root / "source" / "fac" / "big"
        source.mkdir(parents=True)
        rng = random.Random(1)
        for i in range(n):
            patient = samples.make_patient(rng, i)
            with (source / f"img{i}.dcm").open("wb") as fh:
                samples.write_multiframe(
                    fh,
                    patient,
                    f"1.2.826.0.1.3680043.8.498.{i + 1}",
                    f"1.2.826.0.1.3680043.8.499.{i + 1}",
                    frames,
                    seed=i,
                )
        total = sum(p.stat().st_size for p in source.iterdir())
        fs = fsspec.filesystem("file")
        copies = []
        for k in range(2):
            dst = root / f"copy{k}"
            dst.mkdir()
            started = time.perf_counter()
            for p in sorted(source.iterdir()):
                fs.cp_file(str(p), str(dst / p.name))
            copies.append(time.perf_counter() - started)
            for p in dst.iterdir():
                p.unlink()
        copy_s = min(copies)
        # The floor consumes its sources: hard links to the same bytes, no copy.
        linked = root / "floor-source"
        linked.mkdir()
        for p in sorted(source.iterdir()):
            os.link(p, linked / p.name)
        floor_s = promises_floor(linked, root / "floor")
        results = {}
        for mode in MODES:
            run_root = root / mode
            drops = run_root / "home" / "drops" / "fac" / "big"
            drops.mkdir(parents=True)
            for p in sorted(source.iterdir()):
                os.link(p, drops / p.name)  # the same bytes for both runs, no copy
            env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
            with (
                prefect_server(root / "prefect-server")
                if mode == "server"
                else nullcontext({}) as server
            ):
                if server:
                    env["PREFECT_API_URL"] = server["PREFECT_API_URL"]
                proc = subprocess.run(  # noqa: S603 - this interpreter, our own script
                    [sys.executable, "-c", CHILD, str(run_root), mode],
                    capture_output=True,
                    text=True,
                    check=True,
                    env=env,
                )
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            assert results[mode]["ingested"] == n, results[mode]
    mb = total / 1e6
    print(f"files: {n}  bytes: {total:,} ({mb / n:.0f} MB each)  cores: {os.cpu_count()}")
    head = f"{'run':<46}{'MB/s':>8}{'seconds':>9}{'x floor':>9}{'x copy':>8}"
    print(head + f"{'peak RSS':>10}{'before':>8}")
    for label, secs in (("plain fsspec copy", copy_s), ("same-promises floor", floor_s)):
        print(
            f"{label:<46}{mb / secs:>8.0f}{secs:>9.2f}{floor_s / secs:>9.3f}{copy_s / secs:>8.3f}"
        )
    for mode, label in MODES.items():
        r = results[mode]
        secs = r["seconds"]
        print(
            f"{'dropvault, ' + label:<46}{mb / secs:>8.0f}{secs:>9.2f}{floor_s / secs:>9.3f}"
            f"{copy_s / secs:>8.3f}"
            f"{r['peak_rss_mb']:>8.0f}MB{r['baseline_rss_mb']:>6.0f}MB"
        )
    print("goals: >= 0.8x the floor; peak RSS <= 300 MB ('before': peak before the first file)")


if __name__ == "__main__":
    main()
