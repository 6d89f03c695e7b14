"""Crash points: ingest and the deletion sweep killed with SIGKILL in a real subprocess.

Each run is killed at one point, then the flow runs again in this process. Every file must
end cataloged exactly once or quarantined, no plaintext may remain outside the drop zone, no
orphan may survive the reconcile, and a killed sweep must finish the deletion on its rerun.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dropvault.flows.deletion import deletion_sweep
from dropvault.flows.ingest import ingest_drops
from dropvault.flows.settings import Settings
from dropvault.storage.home import Home
from dropvault.tasks import samples
from tests.helpers import cli_env, sources

pytestmark = pytest.mark.integration

RUNNER = """
import os, signal, sys
import dropvault.storage.vault
from dropvault.flows.settings import Settings
from dropvault.storage.home import Home
from dropvault.tasks import deletion, ingest

home_dir, flow, point = sys.argv[1], sys.argv[2], sys.argv[3]
kill = lambda *_: os.kill(os.getpid(), signal.SIGKILL)
if point == "mid_encrypt":
    # Die inside the encryption of a file, after its first segment reached the disk.
    real = dropvault.storage.vault.encrypt_stream
    def dying(src, dst, key_id, record_key, segment_size, on_segment=None):
        def segment(i):
            if i == 1:
                dst.flush()
                kill()
        return real(src, dst, key_id, record_key, 4096, segment)
    dropvault.storage.vault.encrypt_stream = dying
elif flow == "ingest":
    ingest.FAULTS[point] = kill
else:
    deletion.FAULTS[point] = kill
home = Home.init(home_dir)
settings = Settings.load(quiet_seconds=0, home=home_dir)
if flow == "ingest":
    from dropvault.flows.ingest import ingest_drops
    ingest_drops(home=home, settings=settings, orphan_grace_seconds=0)
else:
    from dropvault.flows.deletion import deletion_sweep
    deletion_sweep(home=home, settings=settings)
print("not killed")
"""

INGEST_POINTS = ["after_parse", "mid_encrypt", "after_vault_write", "mid_commit", "after_commit"]
SWEEP_POINTS = ["after_mark", "after_shred", "after_objects", "mid_finish", "after_finish"]


def run_killed(home_dir: Path, flow: str, point: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(home_dir), flow, point],
        env=cli_env(home_dir),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])


def plaintext_outside_drops(home_dir: Path, markers: list[bytes]) -> list[str]:
    """Files outside the drop zone (and Prefect's own database) holding any marker."""
    hits = []
    for path in home_dir.rglob("*"):
        rel = path.relative_to(home_dir).parts
        if not path.is_file() or rel[0] in ("drops", "prefect"):
            continue
        data = path.read_bytes()
        hits += [f"{'/'.join(rel)}" for m in markers if m in data]
    return hits


def one(home: Home, sql: str) -> object:
    return home.catalog.query(sql).iloc[0, 0]


@pytest.mark.parametrize("point", INGEST_POINTS)
def test_ingest_killed_then_rerun(tmp_path: Path, point: str) -> None:
    home_dir = tmp_path / "home"
    home = Home.init(home_dir)
    rng = random.Random(INGEST_POINTS.index(point))
    expected: set[str] = set()
    markers: list[bytes] = []
    for i in range(3):
        patient = samples.make_patient(rng, i)
        _, files = samples.make_study(rng, patient, 4, "CT_small.dcm")
        expected |= {samples.sop_uid(d) for d in files.values()}
        markers += [patient.name.encode(), patient.patient_id.encode()]
        if i == 0:
            files["notes.txt"] = samples.not_dicom()
        samples.write_drop(home.drops, "fac", f"d{i}", files)
    pixels = samples._sample_bytes("CT_small.dcm")[-4096:-4000]
    markers.append(pixels)

    run_killed(home_dir, "ingest", point)
    stats = ingest_drops(home=home, settings=Settings.load(quiet_seconds=0), orphan_grace_seconds=0)

    q = home.catalog.query
    assert set(q("SELECT sop_instance_uid FROM instances")["sop_instance_uid"]) == expected
    assert one(home, "SELECT count(*) - count(DISTINCT sop_instance_uid) FROM instances") == 0
    assert q("SELECT reason FROM quarantine")["reason"].tolist() == ["not_dicom"]
    assert sources(home.drops) == []
    stored = sorted(e.name for e in home.vault.list())
    assert stored == sorted(q("SELECT name FROM objects WHERE kind = 'instance'")["name"])
    assert not [e.name for e in home.quarantine.list() if ".tmp-" in e.name]
    assert plaintext_outside_drops(home_dir, markers) == []
    # Every cataloged object decrypts to the bytes whose hash the catalog holds.
    for name, sha in q(
        "SELECT o.name, i.sha256 FROM objects o JOIN instances i USING (object_id)"
    ).itertuples(index=False):
        assert home.vault_store().digest(name)[1] == sha
    # The rerun accounts for every file it saw: ingested, duplicate (committed before the
    # kill) or quarantined.
    assert stats.files_seen == (stats.ingested + stats.duplicates + sum(stats.quarantined.values()))


@pytest.mark.parametrize("point", SWEEP_POINTS)
def test_sweep_killed_mid_study_then_rerun(tmp_path: Path, point: str) -> None:
    home_dir = tmp_path / "home"
    home = Home.init(home_dir)
    rng = random.Random(100 + SWEEP_POINTS.index(point))
    doomed_patient = samples.make_patient(rng, 1)
    doomed_uid, doomed = samples.make_study(rng, doomed_patient, 3, "MR_small.dcm")
    kept_uid, kept = samples.make_study(rng, samples.make_patient(rng, 2), 2, "MR_small.dcm")
    samples.write_drop(home.drops, "fac", "a", doomed, owners={doomed_uid: "user:eve"})
    samples.write_drop(home.drops, "fac", "b", kept, owners={kept_uid: "user:bob"})
    ingest_drops(home=home, settings=Settings.load(quiet_seconds=0), orphan_grace_seconds=0)
    home.manifests.put_bytes(
        "deletions/eve.jsonl",
        (
            json.dumps(
                {
                    "request_id": "del-1",
                    "owner": "user:eve",
                    "study_uid": doomed_uid,
                    "requested_at": (datetime.now(UTC) - timedelta(hours=1)).isoformat(),
                    "keep_archive": "false",
                }
            )
            + "\n"
        ).encode(),
    )
    key_ids = home.catalog.query(
        "SELECT DISTINCT record_key_id FROM objects JOIN instances USING (object_id)"
        " WHERE study_uid = ?",
        [doomed_uid],
    )["record_key_id"].tolist()

    run_killed(home_dir, "sweep", point)
    deletion_sweep(home=home, settings=Settings.load())

    q = home.catalog.query
    assert q("SELECT status FROM deletion_requests")["status"].tolist() == ["completed"]
    # Verified by the rerun even when the first run died after deleting the rows it needed.
    assert q("SELECT verified_at FROM deletion_requests")["verified_at"].notna().all()
    assert one(home, "SELECT count(*) FROM deletion_objects") == 0
    assert q("SELECT study_uid FROM studies")["study_uid"].tolist() == [kept_uid]
    assert one(home, "SELECT count(*) FROM instances") == 2
    assert home.keystore.live(key_ids) == set()
    stored = sorted(e.name for e in home.vault.list())
    assert stored == sorted(q("SELECT name FROM objects")["name"])
    # PHI nowhere; the study UID nowhere but in the owner's own processed request manifest.
    leaks = plaintext_outside_drops(
        home_dir,
        [doomed_uid.encode(), doomed_patient.name.encode(), doomed_patient.patient_id.encode()],
    )
    assert [p for p in leaks if not p.startswith("manifests/deletions/processed/")] == []
