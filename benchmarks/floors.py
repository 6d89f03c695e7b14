"""Baselines that keep dropvault's promises, for the ingest benchmarks' ratios.

A plain copy is the wrong floor for ingest: it neither encrypts, nor makes its writes
durable, nor removes its source. :func:`promises_floor` does the least any ingest that
keeps those promises must do, with none of dropvault's code: read each file, SHA-256 it
(duplicates are decided by content), AES-256-GCM it in 1 MiB segments with a fresh key
per file (as each study has its own), write it, ``sync`` once per batch, then remove the
batch's sources. No parse, no catalog, no read-back: what it costs is the promise itself.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SEGMENT = 1024 * 1024
BATCH = 500


def promises_floor(src: Path, dst: Path, batch: int = BATCH) -> float:
    """Seconds to encrypt every file below ``src`` into ``dst`` durably and remove the
    sources (``src`` is consumed: pass a copy)."""
    dst.mkdir(parents=True, exist_ok=True)
    paths = sorted(p for p in src.rglob("*") if p.is_file())
    started = time.perf_counter()
    done: list[Path] = []
    for i, path in enumerate(paths):
        aead = AESGCM(AESGCM.generate_key(bit_length=256))
        digest = hashlib.sha256()
        with path.open("rb") as fin, (dst / f"{i:08d}.enc").open("wb") as fout:
            counter = 0
            while chunk := fin.read(SEGMENT):
                digest.update(chunk)
                nonce = counter.to_bytes(12, "big")
                fout.write(aead.encrypt(nonce, chunk, None))
                counter += 1
        done.append(path)
        if len(done) == batch:
            os.sync()
            for p in done:
                p.unlink()
            done = []
    os.sync()
    for p in done:
        p.unlink()
    return time.perf_counter() - started


def fresh_copy(src: Path, dst: Path) -> Path:
    """A copy of ``src`` for a floor run to consume (made outside any timing)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst
