"""Ingest of large multi-frame images against a plain fsspec copy, with peak memory.

    python benchmarks/ingest_large.py            # 4 files of ~210 MB (400 frames of 512x512x16)
    python benchmarks/ingest_large.py --quick    # 2 files of ~10 MB, what CI runs

The files are generated in a stream (tasks.samples.write_multiframe), so nothing here
holds a whole image. The ingest runs in a child process that reports its own peak RSS:
the goal is a ratio >= 0.85 of the copy's throughput with peak RSS <= 300 MB.
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
from pathlib import Path

import fsspec

from tasks import samples

CHILD = """
import json, resource, shutil, sys, time
from pathlib import Path
from flows.settings import Settings, quiet_prefect_defaults
quiet_prefect_defaults()
from flows.ingest import ingest_drops
from storage.home import Home

root = Path(sys.argv[1])
ingest_drops(home=Home.local(root / "warm"), settings=Settings.load(quiet_seconds=0))
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
home = Home.local(root / "home")
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


def encrypt_floor(src: Path, dst: Path) -> float:
    """Read, AES-256-GCM in 1 MiB segments and write each file, then sync: the least an
    encrypting, durable ingest must do (no parse, hash, read-back or catalog)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead = AESGCM(AESGCM.generate_key(bit_length=256))
    dst.mkdir()
    started = time.perf_counter()
    for path in sorted(src.iterdir()):
        with path.open("rb") as fin, (dst / path.name).open("wb") as fout:
            counter = 0
            while chunk := fin.read(1024 * 1024):
                nonce = counter.to_bytes(12, "big")
                fout.write(aead.encrypt(nonce, chunk, None))
                counter += 1
    os.sync()
    seconds = time.perf_counter() - started
    for path in dst.iterdir():
        path.unlink()
    return seconds


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
        floor_s = encrypt_floor(source, root / "floor")
        drops = root / "home" / "drops" / "fac" / "big"
        drops.mkdir(parents=True)
        for p in sorted(source.iterdir()):
            p.replace(drops / p.name)
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(root)],
            capture_output=True,
            text=True,
            check=True,
            env=os.environ.copy(),
        )
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["ingested"] == n, result
    mb = total / 1e6
    ingest_s = result["seconds"]
    print(f"files: {n}  bytes: {total:,} ({mb / n:.0f} MB each)  cores: {os.cpu_count()}")
    print(f"{'run':<20}{'MB/s':>10}{'seconds':>10}")
    print(f"{'plain fsspec copy':<20}{mb / copy_s:>10.0f}{copy_s:>10.2f}")
    print(f"{'encrypt+sync floor':<20}{mb / floor_s:>10.0f}{floor_s:>10.2f}")
    print(f"{'dropvault ingest':<20}{mb / ingest_s:>10.0f}{ingest_s:>10.2f}")
    print(f"ratio ingest / plain copy: {copy_s / ingest_s:.3f}  (goal >= 0.85)")
    print(f"ratio encrypt+sync floor / plain copy: {copy_s / floor_s:.3f}")
    print(
        f"ingest peak RSS: {result['peak_rss_mb']:.0f} MB  (goal <= 300 MB);"
        f" {result['baseline_rss_mb']:.0f} MB of it before the first file"
    )


if __name__ == "__main__":
    main()
