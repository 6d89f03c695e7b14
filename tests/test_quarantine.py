"""Quarantine housekeeping: filters, releasing a file once its cause is fixed, purging."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dropvault.flows.ingest import ingest_drops
from dropvault.flows.settings import Settings
from dropvault.storage.home import Home
from dropvault.tasks import samples
from dropvault.tasks.quarantine import (
    expire_quarantine,
    quarantine_export,
    quarantine_list,
    quarantine_release,
)
from dropvault.tasks.receipts import read_receipt
from tests.helpers import drop_ref, sources

pytestmark = pytest.mark.integration


def _incomplete(home: Home) -> tuple[str, bytes]:
    """A drop whose manifest lists a file that never came: the other goes incomplete."""
    rng = random.Random(5)
    _, files = samples.make_study(rng, samples.make_patient(rng, 5), 2, "CT_small.dcm")
    kept, lost = sorted(files)
    samples.write_drop(home.drops, "fac-q", "d1", files)
    home.drops.delete(f"fac-q/d1/{lost}")
    time.sleep(0.05)
    ingest_drops(home=home, settings=Settings.load(quiet_seconds=0, incomplete_seconds=0.01))
    return kept, files[kept]


def test_filters_and_release(local_home: Home) -> None:
    home = local_home
    name, data = _incomplete(home)
    q = quarantine_list(home.catalog, reason="incomplete_drop")
    assert len(q) == 1
    assert quarantine_list(home.catalog, facility="fac-other").empty
    assert len(quarantine_list(home.catalog, drop=str(q["drop_id"][0]))) == 1
    qid = str(q["quarantine_id"][0])

    result = quarantine_release(home, qid, datetime.now(UTC))
    assert result["released_to"] == f"fac-q/released-{qid}"
    base = name.rsplit("/", 1)[-1]  # the file's own name, in a drop of its own
    assert home.drops.read_bytes(f"fac-q/released-{qid}/{base}") == data
    sql = home.catalog.query
    row = sql("SELECT object_id, detail FROM quarantine WHERE quarantine_id = ?", [qid])
    assert row["object_id"][0] == "" and "released" in row["detail"][0]
    assert sql("SELECT count(*) AS n FROM audit_log WHERE action = 'quarantine_released'")["n"][0]
    assert home.quarantine.list() == []  # the quarantined copy is gone
    with pytest.raises(LookupError):
        quarantine_release(home, qid, datetime.now(UTC))  # nothing left to release

    ingest_drops(home=home, settings=Settings.load(quiet_seconds=0))
    assert sql("SELECT count(*) AS n FROM instances")["n"][0] == 1
    assert (
        read_receipt(home.drops, "fac-q", drop_ref(home, "fac-q", f"released-{qid}"))["ingested"]
        == 1
    )
    assert sources(home.drops) == []


def test_purge_shreds_old_files_and_says_who(local_home: Home, tmp_path: Path) -> None:
    home = local_home
    _incomplete(home)
    qid = str(quarantine_list(home.catalog)["quarantine_id"][0])
    assert expire_quarantine(home, datetime.now(UTC), 30, actor="operator") == 0  # too new
    later = datetime.now(UTC) + timedelta(days=31)
    assert expire_quarantine(home, later, 30, actor="operator") == 1
    audit = home.catalog.query("SELECT actor FROM audit_log WHERE action = 'quarantine_expired'")[
        "actor"
    ].tolist()
    assert audit == ["operator"]
    with pytest.raises(LookupError):  # its bytes are gone
        quarantine_export(home, qid, tmp_path / "never.dcm")
    assert not (tmp_path / "never.dcm").exists()


def test_a_file_with_an_unsafe_name_is_not_released_anywhere(local_home: Home) -> None:
    """An attacker's name (a backslash, here) must not become a path when released."""
    home = local_home
    rng = random.Random(6)
    _, files = samples.make_study(rng, samples.make_patient(rng, 6), 2, "CT_small.dcm")
    data, other = files.values()
    # A facility's client can create such a key; our own writers refuse to.
    samples.write_drop(home.drops, "fac-u", "d1", {"ok.dcm": data}, manifest=False)
    home.drops.fs.pipe_file(f"{home.drops.root}/fac-u/d1/..\\..\\evil.dcm", other)
    ingest_drops(home=home, settings=Settings.load(quiet_seconds=0))
    q = quarantine_list(home.catalog, reason="unsafe_name")
    assert len(q) == 1
    before = sorted(e.name for e in home.drops.list())
    with pytest.raises(ValueError, match="unsafe"):
        quarantine_release(home, str(q["quarantine_id"][0]), datetime.now(UTC))
    assert sorted(e.name for e in home.drops.list()) == before


def test_a_release_never_writes_through_a_symlinked_facility_folder(
    local_home: Home, tmp_path: Path
) -> None:
    """Outside review: a facility folder swapped for a symlink took the released plaintext
    outside the drop zone. The release is refused, and the quarantined copy is kept."""
    home = local_home
    _incomplete(home)
    qid = str(quarantine_list(home.catalog)["quarantine_id"][0])
    root = Path(home.drops.root)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "fac-q").rename(tmp_path / "moved")
    (root / "fac-q").symlink_to(outside)
    with pytest.raises(OSError):
        quarantine_release(home, qid, datetime.now(UTC))
    assert list(outside.iterdir()) == []
    assert len(home.quarantine.list()) == 2  # still kept: the encrypted file and its reason


def test_a_release_stopped_after_its_write_runs_again_and_is_audited_once(
    local_home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside review: a release stopped before its commit had destroyed the key first, so
    no rerun could finish it and no audit row was written."""
    home = local_home
    name, data = _incomplete(home)
    qid = str(quarantine_list(home.catalog)["quarantine_id"][0])
    real_write = type(home.catalog).write

    def stop(self: object, fn: object) -> None:
        raise RuntimeError("stopped before the commit")

    monkeypatch.setattr(type(home.catalog), "write", stop)
    with pytest.raises(RuntimeError):
        quarantine_release(home, qid, datetime.now(UTC))
    monkeypatch.setattr(type(home.catalog), "write", real_write)
    quarantine_release(home, qid, datetime.now(UTC))  # runs again whole
    base = name.rsplit("/", 1)[-1]
    assert home.drops.read_bytes(f"fac-q/released-{qid}/{base}") == data
    n = home.catalog.query(
        "SELECT count(*) AS n FROM audit_log WHERE action = 'quarantine_released'"
    )["n"][0]
    assert n == 1
