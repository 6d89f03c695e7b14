"""Receipts to facilities: what each drop did, in the facility's own folder, never ingested,
naming the facility's files only there."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dropvault.flows.deletion import deletion_sweep
from dropvault.flows.ingest import ingest_drops
from dropvault.flows.settings import Settings
from dropvault.storage.home import Home
from dropvault.tasks import samples
from dropvault.tasks.receipts import read_receipt
from tests.helpers import drop_ref, sources

pytestmark = pytest.mark.integration


def _study(seed: int, n: int = 2) -> tuple[str, dict[str, bytes]]:
    rng = random.Random(seed)
    return samples.make_study(rng, samples.make_patient(rng, seed), n, "CT_small.dcm")


def test_a_finished_drop_gets_a_receipt_with_each_rejected_file_by_name(
    local_home: Home,
) -> None:
    home = local_home
    _, files = _study(1)
    good = next(iter(files.values()))
    bad = {"notes.txt": samples.not_dicom(), "cut/img-77.dcm": samples.truncated(good)}
    samples.write_drop(home.drops, "fac-a", "2026-12 batch", {**files, **bad})
    settings = Settings.load(quiet_seconds=0)
    stats = ingest_drops(home=home, settings=settings)
    r = read_receipt(home.drops, "fac-a", drop_ref(home, "fac-a", "2026-12 batch"))
    assert r["state"] == "done" and r["drop"] == "2026-12 batch"  # inside, not in its path
    assert (r["files_seen"], r["ingested"], r["quarantined"]) == (4, 2, 2)
    assert r["quarantined_files"] == {"not_dicom": ["notes.txt"], "truncated": ["cut/img-77.dcm"]}
    assert r["missing"] == [] and r["incomplete_at"] is None
    lines = stats.drop_lines()
    assert len(lines) == 1 and "2 ingested" in lines[0] and "not_dicom=1" in lines[0]
    assert "batch" not in lines[0]  # the CLI's line names the drop by its keyed id
    # The receipt is the only thing left, and the next pass does not take it for a drop.
    assert sources(home.drops) == []
    again = ingest_drops(home=home, settings=settings)
    assert again.files_seen == 0 and again.drops_waiting == 0
    names = home.catalog.query("SELECT count(*) AS n FROM quarantine")["n"][0]
    assert names == 2


def test_a_waiting_drop_names_what_is_missing_and_when_it_goes_incomplete(
    local_home: Home,
) -> None:
    home = local_home
    _, files = _study(2, 3)
    first = sorted(files)[0]
    samples.write_drop(home.drops, "fac-b", "d1", files)
    home.drops.delete(f"fac-b/d1/{first}")
    settings = Settings.load(quiet_seconds=0, incomplete_seconds=3600)
    stats = ingest_drops(home=home, settings=settings)
    r = read_receipt(home.drops, "fac-b", drop_ref(home, "fac-b", "d1"))
    assert r["state"] == "waiting" and r["missing"] == [first]
    assert "missing" in r["why"]
    due = datetime.fromisoformat(r["incomplete_at"])
    assert timedelta(minutes=55) < due - datetime.now(UTC) <= timedelta(hours=1)
    assert any("waiting" in line for line in stats.drop_lines())


def test_a_late_copy_of_a_deleted_study_is_not_kept_without_saying_why(
    local_home: Home,
) -> None:
    home = local_home
    uid, files = _study(3)
    names = sorted(files)
    settings = Settings.load(quiet_seconds=0)
    samples.write_drop(home.drops, "fac-c", "first", {names[0]: files[names[0]]},
                       owners={uid: "user:zoe"})  # fmt: skip
    ingest_drops(home=home, settings=settings)
    row = {"request_id": "z", "owner": "user:zoe", "study_uid": uid,
           "requested_at": (datetime.now(UTC) - timedelta(minutes=1)).isoformat()}  # fmt: skip
    home.manifests.put_bytes("deletions/z.jsonl", (json.dumps(row) + "\n").encode())
    deletion_sweep(home=home, settings=settings)
    samples.write_drop(home.drops, "fac-c", "again", {names[1]: files[names[1]]})
    ingest_drops(home=home, settings=settings)
    r = read_receipt(home.drops, "fac-c", drop_ref(home, "fac-c", "again"))
    assert r["quarantined_files"] == {"not_kept": ["(1 file(s))"]}
    assert r["drop"] == ""  # the folder (and the file) can name the patient: not named
    text = json.dumps(r)
    assert "deleted" not in text and uid not in text and names[1] not in text


def test_a_drop_folder_named_like_the_receipts_folder_is_never_ingested(
    local_home: Home,
) -> None:
    """An attacker's drop cannot pass itself off as receipts, and receipts cannot be made
    to ingest: ``_receipts`` is reserved, and what is in it stays where it is."""
    home = local_home
    _, files = _study(4)
    samples.write_drop(home.drops, "fac-d", "_receipts", files)
    stats = ingest_drops(home=home, settings=Settings.load(quiet_seconds=0))
    assert stats.files_seen == 0
    assert home.catalog.query("SELECT count(*) AS n FROM instances")["n"][0] == 0
    assert len(sources(home.drops)) == 0 and len(home.drops.list()) == len(files) + 1


def test_a_symlinked_receipts_folder_cannot_send_a_receipt_elsewhere(
    local_home: Home, tmp_path: Path
) -> None:
    """Outside review: ``_receipts`` made a symlink to the home (or another facility's
    receipts) had the receipt overwrite ``dropvault-home.json``. Writes never follow a
    symlinked folder: that drop gets no receipt, the run completes, nothing outside changes."""
    home = local_home
    root = Path(home.drops.root)
    record = (tmp_path / "home" / "dropvault-home.json").read_bytes()
    _, files = _study(7)
    for facility, target in (("evil", tmp_path / "home"), ("evil2", tmp_path / "outside")):
        target.mkdir(exist_ok=True)
        (root / facility).mkdir()
        (root / facility / "_receipts").symlink_to(target)
        samples.write_drop(home.drops, facility, "dropvault-home", files)
    stats = ingest_drops(home=home, settings=Settings.load(quiet_seconds=0))
    assert stats.ingested == len(files) and stats.duplicates == len(files)
    assert (tmp_path / "home" / "dropvault-home.json").read_bytes() == record
    assert list((tmp_path / "outside").iterdir()) == []
