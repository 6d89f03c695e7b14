"""Deletion sweep of N requests (one study each) against a plain delete of the same objects.

    python benchmarks/deletion.py            # 10,000 requests (goal: <= 60 s)
    python benchmarks/deletion.py --quick    # 300 requests (CI)

Setup ingests N single-image studies. The sweep then revokes, tombstones,
crypto-shreds, deletes every object and its rows, verifies, and compacts the
catalog. The baseline removes the same number of files of the same size with
fsspec ``rm``, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import fsspec

from dropvault.flows.settings import Settings, quiet_prefect_defaults

quiet_prefect_defaults()  # before Prefect is imported

from dropvault.flows.deletion import deletion_sweep  # noqa: E402
from dropvault.flows.ingest import ingest_drops  # noqa: E402
from dropvault.storage.home import Home  # noqa: E402
from dropvault.tasks import samples  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n = 300 if args.quick else args.n
    rng = random.Random(5)
    with tempfile.TemporaryDirectory(prefix="dv-del-") as tmp:
        root = Path(tmp)
        home = Home.init(root / "home")
        settings = Settings.load(quiet_seconds=0, home=root / "home")
        owned = []
        for i in range(n):
            patient = samples.make_patient(rng, i)
            uid, files = samples.make_study(rng, patient, 1, "MR_small.dcm")
            samples.write_drop(home.drops, "fac", f"d{i // 500:04d}", files)
            owned.append(uid)
        ingest_drops(home=home, settings=settings)
        owners = dict(
            home.catalog.query("SELECT study_uid, owner FROM studies").itertuples(index=False)
        )
        now = datetime.now(UTC) - timedelta(hours=1)
        text = "".join(
            json.dumps(
                {
                    "request_id": f"del-{i}",
                    "owner": owners[uid],
                    "study_uid": uid,
                    "requested_at": now.isoformat(),
                    "keep_archive": "false",
                }
            )
            + "\n"
            for i, uid in enumerate(owned)
        )
        home.manifests.put_bytes("deletions/bench.jsonl", text.encode())
        size = home.vault.list()[0].size
        started = time.perf_counter()
        result = deletion_sweep(home=home, settings=settings)
        sweep_s = time.perf_counter() - started
        summary = result.summary()
        assert summary["studies_deleted"] == n and summary["all_verified"], summary
        assert home.vault.list() == []
        # Baseline: plain fsspec deletes of n files of the same size.
        fs = fsspec.filesystem("file")
        plain = root / "plain"
        plain.mkdir()
        for i in range(n):
            (plain / f"{i}.bin").write_bytes(b"\0" * size)
        started = time.perf_counter()
        for i in range(n):
            fs.rm(str(plain / f"{i}.bin"))
        plain_s = time.perf_counter() - started
    print(f"requests: {n}  cores: 2  object size: {size} bytes")
    print(f"{'run':<24}{'seconds':>10}{'per request':>14}")
    print(f"{'deletion sweep':<24}{sweep_s:>10.2f}{sweep_s / n * 1000:>12.2f} ms")
    print(f"{'plain fsspec rm':<24}{plain_s:>10.2f}{plain_s / n * 1000:>12.2f} ms")
    print(
        f"sweep / plain rm time: {sweep_s / plain_s:.1f}x; goal: {n} requests in <= 60 s "
        f"({'met' if sweep_s <= 60 * n / 10_000 else 'NOT met'}, scaled to n)"
    )
    print(f"catalog compaction: {summary['catalog_compaction']}")


if __name__ == "__main__":
    main()
