"""Helpers that several test modules share (no test module imports another)."""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from prefect.settings import PREFECT_API_URL

from dropvault.storage.ducklake import Lake
from dropvault.storage.home import Home
from dropvault.storage.locations import Entry, Location
from dropvault.tasks import samples
from dropvault.tasks.drop_names import drop_id_for
from dropvault.tasks.drops import scan_drops
from dropvault.tasks.ingest import ingest_batch
from dropvault.tasks.layout import RECEIPTS

EXE = shutil.which("dropvault") or str(Path(sys.executable).with_name("dropvault"))


def cli_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DROPVAULT_")}
    env["DROPVAULT_HOME"] = str(home)
    api = PREFECT_API_URL.value()  # the session's test server: no ephemeral one per call
    if api:
        env["PREFECT_API_URL"] = api
    return env


def lake_env(lake: Lake) -> dict[str, str]:
    return {
        "DROPVAULT_CATALOG_URL": "ducklake:postgres:" + lake.metadata,
        "DROPVAULT_CATALOG_DATA_URL": lake.data_url,
        "DROPVAULT_CATALOG_SCHEMA": lake.schema or "",
        "DROPVAULT_S3_ENDPOINT_URL": lake.s3["endpoint_url"],
        "DROPVAULT_S3_KEY": "foo",
        "DROPVAULT_S3_SECRET": "foo",
        "DROPVAULT_QUIET_SECONDS": "0",
        "DROPVAULT_BATCH_FILES": "8",
    }


NOW = datetime.now(UTC)


def ts(days: float = 0) -> str:
    return (NOW + timedelta(days=days)).isoformat()


def seed(home: Home, owners: dict[str, int], rng: random.Random) -> dict[str, list[str]]:
    """Ingest one study per count for each owner (real ingest, no Prefect); returns study UIDs."""
    studies: dict[str, list[str]] = {}
    for owner, count in owners.items():
        for i in range(count):
            uid, files = samples.make_study(rng, samples.make_patient(rng, i), 1, "MR_small.dcm")
            drop_id = f"{owner.replace(':', '-')}-{i}-{rng.randrange(10**6)}"
            samples.write_drop(home.drops, "fac", drop_id, files, owners={uid: owner})
            studies.setdefault(owner, []).append(uid)
    home.catalog.migrate()
    for drop in scan_drops(home.drops, home.pepper, time.time(), 0, 86400):
        ingest_batch(home, [(drop, f) for f in drop.files], max_file_bytes=10**9)
    return studies


def write_manifest(home: Home, name: str, rows: list[dict[str, str]]) -> None:
    if name.endswith(".csv"):
        cols = list(rows[0])
        text = (
            ",".join(cols)
            + "\n"
            + "".join(",".join(r.get(c, "") for c in cols) + "\n" for r in rows)
        )
    else:
        text = "".join(json.dumps(r) + "\n" for r in rows)
    home.manifests.put_bytes(f"shares/{name}", text.encode())


def req(
    rid: str, action: str, owner: str, grantee: str, study: str, days: float, **extra: str
) -> dict[str, str]:
    return {
        "request_id": rid,
        "action": action,
        "owner": owner,
        "grantee": grantee,
        "study_uid": study,
        "requested_at": ts(days),
        **extra,
    }


def drop_ref(home: Home, facility_id: str, folder: str) -> str:
    """The keyed id the catalog knows the drop folder ``facility_id/folder`` by."""
    return drop_id_for(home.pepper, facility_id, folder)


def sources(drops: Location) -> list[Entry]:
    """What is left in a drops location besides the receipts written to facilities."""
    return [e for e in drops.list() if e.name.split("/")[1:2] != [RECEIPTS]]
