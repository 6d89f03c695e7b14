"""An owner's archive election (issue #25): a ``keep_archive`` sweep stopped after its
first object moved resumes on the next sweep, and is verified only once every object is
in the archive and nothing of it (no version, no delete marker) is left in the vault;
every image still exports. On file:// and on moto's versioned S3."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from dropvault.flows.deletion import deletion_sweep
from dropvault.flows.ingest import ingest_drops
from dropvault.storage.errors import TerminalError
from dropvault.storage.home import Home
from dropvault.tasks import deletion, samples
from dropvault.tasks.exports import export_instance
from tests.test_deletion_traces import NOW, QUIET, dhome, every_version

__all__ = ["dhome"]  # the fixture: file://, or moto S3 with a versioned bucket


class Stop(TerminalError, RuntimeError):
    """A stop no retry takes up (as a killed worker)."""


def test_a_stopped_archive_move_resumes_and_is_verified_in_place(
    dhome: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = dhome
    rng = random.Random(25)
    uid, files = samples.make_study(rng, samples.make_patient(rng, 1), 3, "MR_small.dcm")
    samples.write_drop(home.drops, "fac", "d", files, owners={uid: "user:cat"})
    ingest_drops(home=home, settings=QUIET)
    row = {
        "request_id": "arch-1",
        "owner": "user:cat",
        "study_uid": uid,
        "requested_at": NOW.isoformat(),
        "keep_archive": "true",
    }
    home.manifests.put_bytes("deletions/a.jsonl", (json.dumps(row) + "\n").encode())

    def stop() -> None:
        raise Stop("stopped after the first move")

    monkeypatch.setitem(deletion.FAULTS, "mid_archive", stop)
    with pytest.raises(Stop):
        deletion_sweep(home=home, settings=QUIET)
    assert len(home.archive.list()) == 1  # one moved, two still in the vault
    status = home.catalog.query("SELECT status, verified_at FROM deletion_requests")
    assert status["status"].tolist() == ["pending"] and status["verified_at"].isna().all()
    monkeypatch.delitem(deletion.FAULTS, "mid_archive")

    summary = deletion_sweep(home=home, settings=QUIET).summary()
    assert (summary["studies_archived"], summary["all_verified"]) == (1, True)
    assert len(home.archive.list()) == 3
    assert home.vault.list() == [] and every_version(home.vault) == []
    where = home.catalog.query("SELECT DISTINCT location_url FROM objects")["location_url"]
    assert where.tolist() == [home.archive.url]
    verified = home.catalog.query("SELECT status, verified_at FROM deletion_requests")
    assert verified["status"].tolist() == ["completed"] and verified["verified_at"].notna().all()
    for i, sop in enumerate(samples.sop_uid(d) for d in files.values()):
        export_instance(home, sop, tmp_path / f"{i}.dcm")
    assert sorted(p.read_bytes() for p in tmp_path.glob("*.dcm")) == sorted(files.values())
