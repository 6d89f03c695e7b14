"""Deployment end to end: a real ``prefect server start``, ``prefect deploy --all``, a worker,
and a run of ``ingest-drops`` against a home with drops; then SQL against its catalog."""

from __future__ import annotations

import json
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from dropvault.storage.catalog import Catalog
from dropvault.storage.home import Home
from dropvault.tasks import samples
from tests.helpers import EXE, sources
from tests.prefect_server import PREFECT, prefect_server

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def server(tmp_path: Path) -> Iterator[dict[str, str]]:
    with prefect_server(tmp_path / "prefect-home") as env:
        yield env


def run(env: dict[str, str], *args: str, timeout: float = 180) -> str:
    proc = subprocess.run(
        [PREFECT, *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"prefect {args}: {proc.stdout[-1500:]} {proc.stderr[-1500:]}"
    return proc.stdout


def test_every_entrypoint_imports_and_every_schedule_parses() -> None:
    from prefect.client.schemas.schedules import CronSchedule

    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    names = set()
    for dep in doc["deployments"]:
        path, fn = dep["entrypoint"].split(":")
        module = path.removesuffix(".py").replace("/", ".")
        flow = getattr(__import__(module, fromlist=[fn]), fn)
        assert flow.name == dep["name"]
        names.add(dep["name"])
        assert dep["work_pool"]["name"] == "dropvault"
        for schedule in dep["schedules"]:
            CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    assert names == {
        "ingest-drops",
        "apply-share-manifests",
        "deliver-shares",
        "policy-notices",
        "deletion-sweep",
        "compile-beacon-stats",
        "reconcile-vault",
    }


def test_deploy_and_run_ingest_on_a_worker(server: dict[str, str], tmp_path: Path) -> None:
    home_dir = tmp_path / "home"
    home = Home.init(home_dir)
    rng = random.Random(4)
    uid, files = samples.make_study(rng, samples.make_patient(rng, 1), 3, "CT_small.dcm")
    samples.write_drop(home.drops, "fac-deploy", "d1", files)
    env = {**server, "DROPVAULT_HOME": str(home_dir)}
    made = subprocess.run([EXE, "work-pool"], env=env, capture_output=True, text=True, check=True)
    assert "work pool dropvault: created" in made.stdout
    run(server, "--no-prompt", "deploy", "--all")  # no dropvault setting where it deploys
    out = run(env, "deployment", "run", "ingest-drops/ingest-drops")
    assert "ingest-drops" in out
    run(env, "worker", "start", "--pool", "dropvault", "--run-once", timeout=300)
    runs = httpx.post(
        f"{env['PREFECT_API_URL']}/flow_runs/filter", json={"limit": 5}, timeout=10
    ).json()
    assert [r["state_type"] for r in runs] == ["COMPLETED"]
    n = Catalog(home_dir / "catalog.duckdb").query(
        "SELECT count(*) AS n FROM instances WHERE study_uid = ?", [uid]
    )["n"][0]
    assert n == 3
    assert sources(home.drops) == []

    # A Prefect API user cannot run another command on the worker (one printing its
    # environment, with the keys), nor point a flow at other locations.
    leak = tmp_path / "env.txt"
    refused = subprocess.run(
        [PREFECT, "deployment", "run", "reconcile-vault/reconcile-vault", "--job-variable",
         f'command=sh -c "env > {leak}"'],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert refused.returncode != 0 and "command" in refused.stdout + refused.stderr
    elsewhere = tmp_path / "elsewhere"
    samples.write_drop(Home.init(elsewhere).drops, "fac", "d9", files)
    settings = {"home": str(elsewhere), "drops_url": (elsewhere / "drops").as_uri()}
    # The deployment offers no such parameter: Prefect's CLI refuses it...
    cli = subprocess.run(
        [PREFECT, "deployment", "run", "ingest-drops/ingest-drops", "--param",
         f"settings={json.dumps(settings)}"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert cli.returncode != 0 and "settings" in cli.stdout + cli.stderr
    # ...and a run made through the API with it anyway is refused by the server or fails.
    api = env["PREFECT_API_URL"]
    [dep] = httpx.post(
        f"{api}/deployments/filter",
        json={"deployments": {"name": {"any_": ["ingest-drops"]}}},
        timeout=10,
    ).json()
    made_run = httpx.post(
        f"{api}/deployments/{dep['id']}/create_flow_run",
        json={"parameters": {"settings": settings}},
        timeout=10,
    )
    if made_run.status_code < 300:
        run(env, "worker", "start", "--pool", "dropvault", "--run-once", timeout=300)
        state = httpx.get(f"{api}/flow_runs/{made_run.json()['id']}", timeout=10).json()
        assert state["state_type"] == "FAILED"
    assert not leak.exists()
    assert len(Home.local(elsewhere).drops.list()) == 4  # untouched: three images, manifest


def test_the_scheduler_schedules_every_deployment(tmp_path: Path) -> None:
    """With its scheduler on, the server gives every deployment in prefect.yaml scheduled
    runs, and logs no error doing it (prefect 3.9.0 with SQLAlchemy 2.1 failed every loop)."""
    log = tmp_path / "server.log"
    with prefect_server(tmp_path / "prefect-home", scheduler=True, log=log) as env:
        made = subprocess.run(
            [EXE, "work-pool"],
            env={**env, "DROPVAULT_HOME": str(tmp_path / "h")},
            capture_output=True,
            text=True,
            check=False,
        )
        assert made.returncode == 0, made.stderr
        run(env, "--no-prompt", "deploy", "--all")
        api = env["PREFECT_API_URL"]
        deployments = httpx.post(f"{api}/deployments/filter", json={}, timeout=10).json()
        wanted = {d["id"]: d["name"] for d in deployments}
        assert len(wanted) == len(
            yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
        )
        scheduled: dict[str, int] = {}
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            runs = httpx.post(
                f"{api}/flow_runs/filter",
                json={"flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}, "limit": 200},
                timeout=10,
            ).json()
            scheduled = {}
            for r in runs:
                name = wanted.get(r["deployment_id"])
                if name:
                    scheduled[name] = scheduled.get(name, 0) + 1
            if set(scheduled) == set(wanted.values()):
                break
            time.sleep(1)
        assert set(scheduled) == set(wanted.values()), scheduled
        time.sleep(3)  # a few more scheduler loops, for any error they would log
    text = log.read_text(errors="replace")
    bad = [line for line in text.splitlines() if "ERROR" in line or "Traceback" in line]
    assert not bad, "\n".join(bad[:20])
