"""Two flows in parallel processes (ingest and a deletion sweep) while a third process reads the
catalog read-only in a loop: all succeed and the catalog is consistent."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dropvault.storage.home import Home
from dropvault.tasks import samples
from dropvault.tasks.drops import scan_drops
from dropvault.tasks.ingest import ingest_batch
from tests.helpers import EXE, cli_env

pytestmark = pytest.mark.integration

READER = """
import sys, time
from dropvault.storage.catalog import Catalog
catalog, until, reads = Catalog(sys.argv[1], lock_timeout=60), time.time() + float(sys.argv[2]), 0
while time.time() < until:
    catalog.query("SELECT count(*) FROM instances JOIN objects USING (object_id)")
    reads += 1
print(reads)
"""


def test_ingest_and_sweep_in_parallel_with_a_reader(tmp_path: Path) -> None:
    home_dir = tmp_path / "home"
    home = Home.init(home_dir)
    rng = random.Random(8)
    old = []
    for i in range(6):
        uid, files = samples.make_study(rng, samples.make_patient(rng, i), 2, "MR_small.dcm")
        samples.write_drop(home.drops, "fac", f"old-{i}", files, owners={uid: f"user:{i}"})
        old.append((uid, f"user:{i}"))
    home.catalog.migrate()
    for drop in scan_drops(home.drops, home.pepper, time.time(), 0, 86400):
        ingest_batch(home, [(drop, f) for f in drop.files], max_file_bytes=10**9)
    now = datetime.now(UTC) - timedelta(hours=1)
    home.manifests.put_bytes(
        "deletions/d.jsonl",
        "".join(
            json.dumps(
                {
                    "request_id": f"r{i}",
                    "owner": o,
                    "study_uid": u,
                    "requested_at": now.isoformat(),
                    "keep_archive": "false",
                }
            )
            + "\n"
            for i, (u, o) in enumerate(old)
        ).encode(),
    )
    new = []
    for i in range(20):
        uid, files = samples.make_study(rng, samples.make_patient(rng, 100 + i), 3, "CT_small.dcm")
        samples.write_drop(home.drops, f"fac-{i % 3}", f"new-{i}", files)
        new.append(uid)

    env = cli_env(home_dir)
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(home_dir / "catalog.duckdb"), "20"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    flows = [
        subprocess.Popen(
            [EXE, cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for cmd in ("ingest", "sweep")
    ]
    for proc in [*flows, reader]:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    assert int(out.strip()) > 0  # the reader kept reading throughout

    q = home.catalog.query
    assert sorted(q("SELECT study_uid FROM studies")["study_uid"]) == sorted(new)
    assert q("SELECT count(*) AS n FROM instances")["n"][0] == 60
    stored = sorted(e.name for e in home.vault.list())
    assert stored == sorted(q("SELECT name FROM objects WHERE kind = 'instance'")["name"])
    assert q("SELECT count(*) AS n FROM deletion_requests WHERE status = 'completed'")["n"][0] == 6


def test_catalog_writes_take_the_global_concurrency_slot(tmp_path: Path) -> None:
    """Writers through a home built from settings never overlap, and the limit is on the server."""
    import threading

    from prefect.client.orchestration import get_client

    from dropvault.flows.limits import CATALOG_WRITE_LIMIT
    from dropvault.flows.settings import Settings

    catalog = Settings.load(home=tmp_path).init_home()[0].catalog
    catalog.migrate()
    spans: list[tuple[float, float]] = []

    def work(con: object) -> None:
        start = time.perf_counter()
        time.sleep(0.3)
        spans.append((start, time.perf_counter()))

    threads = [threading.Thread(target=catalog.write, args=(work,)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spans.sort()
    assert len(spans) == 3
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), spans
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(CATALOG_WRITE_LIMIT)
    assert limit.limit == 1 and limit.active
