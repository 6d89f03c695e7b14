"""The ingest suite, on file://, memory:// and s3:// (moto) through the ``home`` fixture."""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from pathlib import Path

import pytest

import dropvault.flows.ingest as flows_ingest
from dropvault.flows.ingest import ingest_drops, reconcile_vault
from dropvault.flows.settings import Settings
from dropvault.storage.home import Home
from dropvault.tasks import ingest as ingest_mod
from dropvault.tasks import reconcile, samples
from dropvault.tasks.drops import scan_drops
from dropvault.tasks.exports import ExportError, export_instance
from dropvault.tasks.layout import PENDING
from dropvault.tasks.quarantine import quarantine_export
from dropvault.tasks.reconcile import record_pending, settle_pending
from tests.helpers import drop_ref, sources


def run(home: Home, **overrides: object) -> ingest_mod.IngestStats:
    settings = Settings.load(quiet_seconds=0, **overrides)
    return ingest_drops(home=home, settings=settings, orphan_grace_seconds=0)


def drop_status(home: Home, facility_id: str, folder: str) -> object:
    """The catalog's status of a drop, found by its keyed id (the folder name is not kept)."""
    sql = "SELECT status FROM drops WHERE drop_id = ?"
    return one(home, sql, [drop_ref(home, facility_id, folder)])


def one(home: Home, sql: str, params: list[object] | None = None) -> object:
    return home.catalog.query(sql, params).iloc[0, 0]


def study_drop(
    rng: random.Random, n: int = 3, sample: str = "CT_small.dcm"
) -> tuple[str, dict[str, bytes]]:
    return samples.make_study(rng, samples.make_patient(rng, rng.randrange(1000)), n, sample)


def test_ingest_catalogs_encrypts_and_cleans_up(home: Home, rng: random.Random) -> None:
    study_uid, files = study_drop(rng, 3)
    samples.write_drop(home.drops, "fac-a", "d1", files, owners={study_uid: "user:alice"})
    stats = run(home)
    assert (stats.ingested, stats.duplicates, sum(stats.quarantined.values())) == (3, 0, 0)
    assert one(home, "SELECT count(*) FROM instances WHERE study_uid = ?", [study_uid]) == 3
    assert one(home, "SELECT owner FROM studies WHERE study_uid = ?", [study_uid]) == "user:alice"
    assert (
        one(home, "SELECT status FROM drops WHERE drop_id = ?", [drop_ref(home, "fac-a", "d1")])
        == "done"
    )
    # Every instance has an object, recorded with where it lives (P8).
    assert (
        one(
            home,
            "SELECT count(*) FROM instances i JOIN objects o USING (object_id)"
            " WHERE o.location_url = ? AND o.kind = 'instance'",
            [home.vault.url],
        )
        == 3
    )
    assert sources(home.drops) == []  # sources removed, manifest too
    # Stored bytes are encrypted: no DICM magic, no pixel bytes.
    for entry in home.vault.list():
        data = home.vault.read_bytes(entry.name)
        assert data.startswith(b"DVLT") and b"DICM" not in data


def test_owner_defaults_to_patient_pseudonym(home: Home, rng: random.Random) -> None:
    study_uid, files = study_drop(rng, 1)
    samples.write_drop(home.drops, "fac-a", "d1", files)
    run(home)
    owner, pkey = home.catalog.query(
        "SELECT owner, patient_key FROM studies WHERE study_uid = ?", [study_uid]
    ).iloc[0]
    assert owner == f"patient:{pkey}" and pkey.startswith("pk_")


def test_export_is_byte_identical_and_audited(
    home: Home, rng: random.Random, tmp_path: Path
) -> None:
    _, files = study_drop(rng, 2)
    samples.write_drop(home.drops, "fac-a", "d1", files)
    run(home)
    for data in files.values():
        uid = samples.sop_uid(data)
        out = tmp_path / "out.dcm"
        export_instance(home, uid, out)
        assert out.read_bytes() == data
        assert (
            one(
                home,
                "SELECT count(*) FROM audit_log WHERE action = 'export' AND subject = ?",
                [uid],
            )
            == 1
        )
    with pytest.raises(ExportError, match="no cataloged instance"):
        export_instance(home, "1.2.3.4", tmp_path / "x.dcm")


def test_duplicate_is_counted_and_removed(home: Home, rng: random.Random) -> None:
    _, files = study_drop(rng, 2)
    samples.write_drop(home.drops, "fac-a", "d1", files)
    run(home)
    samples.write_drop(home.drops, "fac-b", "d2", files)  # same files again, another facility
    stats = run(home)
    assert stats.duplicates == 2 and stats.ingested == 0
    assert one(home, "SELECT count(*) FROM instances") == 2
    assert sources(home.drops) == []


def test_duplicate_within_one_drop(home: Home, rng: random.Random) -> None:
    _, files = study_drop(rng, 1)
    data = next(iter(files.values()))
    samples.write_drop(home.drops, "fac-a", "d1", {"a.dcm": data, "copy/a.dcm": data})
    stats = run(home)
    assert (stats.ingested, stats.duplicates) == (1, 1)


def test_conflict_is_quarantined_with_bytes(home: Home, rng: random.Random, tmp_path: Path) -> None:
    _, files = study_drop(rng, 1)
    data = next(iter(files.values()))
    samples.write_drop(home.drops, "fac-a", "d1", {"a.dcm": data})
    run(home)
    other = samples.with_uid(data, samples.sop_uid(data), tweak=b"other content")
    samples.write_drop(home.drops, "fac-a", "d2", {"b.dcm": other})
    stats = run(home)
    assert stats.quarantined == {"uid_conflict": 1}
    qid = one(home, "SELECT quarantine_id FROM quarantine WHERE reason = 'uid_conflict'")
    out = tmp_path / "q.dcm"
    result = quarantine_export(home, str(qid), out)
    assert out.read_bytes() == other
    assert result["source_name"] == "fac-a/d2/b.dcm"


def _bad_files(rng: random.Random) -> dict[str, tuple[str, bytes]]:
    _, files = study_drop(rng, 1)
    good = next(iter(files.values()))
    return {
        "not_dicom": ("notes.txt", samples.not_dicom()),
        "truncated": ("cut.dcm", samples.truncated(good)),
        "missing_uid": ("nouid.dcm", samples.without(good, "StudyInstanceUID")),
        "unsafe_name": ("evil\\..\\name.dcm", good),
        "too_large": ("big.dcm", samples.with_uid(good, "1.2.826.0.1.3680043.8.498.1")),
    }


@pytest.mark.parametrize("reason", ["not_dicom", "truncated", "missing_uid", "unsafe_name"])
def test_each_bad_file_is_quarantined_with_reason(
    home: Home, rng: random.Random, reason: str, tmp_path: Path
) -> None:
    name, bad = _bad_files(rng)[reason]
    _, good_files = study_drop(rng, 2, "MR_small.dcm")  # ~10 kB each; the bad ones are CT (~39 kB)
    if reason == "unsafe_name":
        # A facility's client can create such a key; our own writers refuse to.
        samples.write_drop(home.drops, "fac-a", "d1", good_files, manifest=False)
        home.drops.fs.pipe_file(f"{home.drops.root}/fac-a/d1/{name}", bad)
    else:
        good_files[name] = bad
        samples.write_drop(home.drops, "fac-a", "d1", good_files)
    stats = run(home)
    assert stats.quarantined == {reason: 1}
    assert stats.ingested == 2  # the good files of the same drop still commit
    row = home.catalog.query("SELECT * FROM quarantine").iloc[0]
    assert row["reason"] == reason and row["sha256"] == hashlib.sha256(bad).hexdigest()
    # The bytes are kept, encrypted, beside a PHI-free reason file.
    names = [e.name for e in home.quarantine.list()]
    assert any(n.endswith(".dvlt") for n in names) and any(n.endswith(".json") for n in names)
    for n in names:
        assert bad not in home.quarantine.read_bytes(n)
    out = tmp_path / "q.bin"
    quarantine_export(home, str(row["quarantine_id"]), out)
    assert out.read_bytes() == bad
    assert sources(home.drops) == []


def test_a_file_over_the_size_limit_is_reported_once_and_never_read_or_stored(
    home: Home, rng: random.Random
) -> None:
    """A sparse terabyte costs a facility nothing: it is not read, hashed or stored."""
    name, big = _bad_files(rng)["too_large"]
    _, good_files = study_drop(rng, 2, "MR_small.dcm")
    good_files[name] = big
    samples.write_drop(home.drops, "fac-a", "d1", good_files, manifest=False)
    stats = run(home, max_file_bytes=20_000)
    assert (stats.quarantined, stats.ingested) == ({"too_large": 1}, 2)
    row = home.catalog.query("SELECT * FROM quarantine").iloc[0]
    assert (row["reason"], row["object_id"], row["sha256"]) == ("too_large", "", "")
    assert home.quarantine.list() == []
    assert [e.name for e in sources(home.drops)] == [f"fac-a/d1/{name}"]  # left in place
    assert run(home, max_file_bytes=20_000).quarantined == {}  # reported once
    assert drop_status(home, "fac-a", "d1") == "partial"


def test_checksum_mismatch(home: Home, rng: random.Random) -> None:
    _, files = study_drop(rng, 2)
    name, data = next(iter(files.items()))
    listed = dict(files)
    listed[name] = data[:-1] + bytes([data[-1] ^ 1])  # same size, other bytes
    samples.write_drop(home.drops, "fac-a", "d1", files, listed=listed)
    stats = run(home)
    assert stats.quarantined == {"checksum_mismatch": 1} and stats.ingested == 1


def test_incomplete_manifest_waits_then_quarantines(home: Home, rng: random.Random) -> None:
    _, files = study_drop(rng, 2)
    name = next(iter(files))
    present = {k: v for k, v in files.items() if k != name}
    samples.write_drop(home.drops, "fac-a", "d1", present, listed=files)
    stats = run(home)
    assert stats.drops_waiting == 1 and stats.files_seen == 0
    assert len(sources(home.drops)) == 2  # file and manifest untouched
    stats = run(home, incomplete_seconds=0.001)
    assert stats.quarantined == {"incomplete_drop": 1}
    assert (
        one(home, "SELECT status FROM drops WHERE drop_id = ?", [drop_ref(home, "fac-a", "d1")])
        == "incomplete"
    )
    assert sources(home.drops) == []


def test_drop_without_manifest_waits_for_quiet(home: Home, rng: random.Random) -> None:
    _, files = study_drop(rng, 2)
    samples.write_drop(home.drops, "fac-a", "d1", files, manifest=False)
    stats = ingest_drops(home=home, settings=Settings.load(quiet_seconds=3600))
    assert stats.drops_waiting == 1 and stats.ingested == 0
    assert run(home).ingested == 2


@pytest.mark.parametrize(
    "point", ["after_parse", "mid_encrypt", "after_vault_write", "mid_commit", "after_commit"]
)
def test_crash_then_rerun_loses_nothing(
    home: Home, rng: random.Random, point: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, files = study_drop(rng, 3)
    files["bad.txt"] = samples.not_dicom()
    samples.write_drop(home.drops, "fac-a", "d1", files)

    def boom() -> None:
        raise RuntimeError(f"injected crash at {point}")

    monkeypatch.setitem(ingest_mod.FAULTS, point, boom)
    # A crash is not an I/O error: no retries, so the test sees the interrupted state.
    monkeypatch.setattr(
        flows_ingest, "ingest_batch_task", ingest_mod.ingest_batch_task.with_options(retries=0)
    )
    with pytest.raises(RuntimeError, match="injected crash"):
        ingest_drops(home=home, settings=Settings.load(quiet_seconds=0), orphan_grace_seconds=3600)
    monkeypatch.delitem(ingest_mod.FAULTS, point)
    run(home)
    cataloged = home.catalog.query("SELECT sop_instance_uid FROM instances")["sop_instance_uid"]
    assert sorted(cataloged) == sorted(
        samples.sop_uid(d) for n, d in files.items() if n != "bad.txt"
    )
    assert one(home, "SELECT count(*) FROM quarantine") == 1
    # No orphan: every vault object has exactly one row, every row an object.
    stored = sorted(e.name for e in home.vault.list())
    rows = sorted(home.catalog.query("SELECT name FROM objects WHERE kind = 'instance'")["name"])
    assert stored == rows
    assert sources(home.drops) == []


def test_a_drop_left_half_done_resumes_at_once(
    home: Home, rng: random.Random, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash in a drop's second batch leaves its first batch's sources removed. The next
    pass must finish the drop now, not wait for it to go incomplete and quarantine the rest."""
    _, files = study_drop(rng, 5)
    samples.write_drop(home.drops, "fac-a", "d1", files)
    calls: list[int] = []

    def second_batch_dies() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected crash in batch 2")

    monkeypatch.setitem(ingest_mod.FAULTS, "after_commit", second_batch_dies)
    monkeypatch.setattr(
        flows_ingest, "ingest_batch_task", ingest_mod.ingest_batch_task.with_options(retries=0)
    )
    with pytest.raises(RuntimeError, match="injected crash"):
        run(home, batch_files=2, batches_in_flight=1)  # one at a time: "batch 2" is well defined
    monkeypatch.delitem(ingest_mod.FAULTS, "after_commit")
    left = [e for e in home.drops.list() if not e.name.endswith("manifest.json")]
    assert len(left) == 3  # batch 1's two sources went; batch 2 committed but kept its sources
    stats = run(home, batch_files=2)  # incomplete_seconds stays at its default (hours)
    assert stats.drops_waiting == 0 and not stats.quarantined
    assert (stats.ingested, stats.duplicates) == (1, 2)
    assert one(home, "SELECT count(*) FROM instances") == 5
    assert (
        one(home, "SELECT status FROM drops WHERE drop_id = ?", [drop_ref(home, "fac-a", "d1")])
        == "done"
    )
    assert sources(home.drops) == []


def test_batches_in_flight_together_catalog_a_file_once_and_finish_it_in_the_run(
    home: Home, rng: random.Random, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two batches of one run hold the same file at once (both past their look-ups, both
    with a vault copy). One commit wins; the other drops its copy, and the run classifies
    the file again at its end: a duplicate, with every drop finished and no orphan."""
    _, files = study_drop(rng, 1)
    samples.write_drop(home.drops, "fac-a", "d1", files)
    samples.write_drop(home.drops, "fac-b", "d2", {"again.dcm": next(iter(files.values()))})
    second_written = threading.Event()
    calls: list[int] = []
    waits: list[bool] = []

    def written() -> None:
        calls.append(1)
        if len(calls) == 2:
            second_written.set()  # the second batch is past its look-ups, with a vault copy

    turn = threading.Lock()

    def first_commit_waits() -> None:
        with turn:
            first = not waits
            waits.append(first)
        if first:  # the first batch syncs and commits only once the second has its copy
            waits[0] = second_written.wait(timeout=60)

    monkeypatch.setitem(ingest_mod.FAULTS, "after_vault_write", written)
    monkeypatch.setitem(ingest_mod.FAULTS, "before_sync", first_commit_waits)
    stats = run(home, batch_files=1, batches_in_flight=2)
    assert waits == [True, False, False] and len(calls) == 3  # 2 at once, then the hand-back
    assert (stats.files_seen, stats.ingested, stats.duplicates) == (2, 1, 1)
    assert stats.retry == [] and stats.drops_done == 2
    assert one(home, "SELECT count(*) FROM instances") == 1
    assert one(home, "SELECT count(*) FROM drops WHERE status = 'done'") == 2
    assert one(home, "SELECT sum(files_seen) FROM drops") == 2
    assert sources(home.drops) == []
    assert [e.name for e in home.vault.list()] == list(
        home.catalog.query("SELECT name FROM objects WHERE kind = 'instance'")["name"]
    )


def test_a_file_that_lost_a_commit_race_is_taken_up_next_pass(
    home: Home, rng: random.Random, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers catalog the same file at once: the later commit finds it taken, drops its
    vault copy and leaves the source. The next pass counts it a duplicate and ends the drop."""
    _, files = study_drop(rng, 3)
    twice = next(iter(files.values()))
    samples.write_drop(home.drops, "fac-a", "d1", files)
    samples.write_drop(home.drops, "fac-b", "d2", {"again.dcm": twice})
    home.catalog.migrate()
    drops = {d.folder: d for d in scan_drops(home.drops, home.pepper, time.time(), 0, 86400)}

    def other_worker_commits_first() -> None:
        monkeypatch.delitem(ingest_mod.FAULTS, "after_vault_write")
        d2 = drops["fac-b/d2"]
        assert (
            ingest_mod.ingest_batch(
                home, [(d2, f) for f in d2.files], max_file_bytes=10**9
            ).ingested
            == 1
        )

    monkeypatch.setitem(ingest_mod.FAULTS, "after_vault_write", other_worker_commits_first)
    d1 = drops["fac-a/d1"]
    lost = ingest_mod.ingest_batch(home, [(d1, f) for f in d1.files], max_file_bytes=10**9)
    assert lost.ingested == 2  # the raced file stays in its drop
    assert len(home.vault.list()) == 3  # the losing copy was removed from the vault
    stats = run(home)
    assert (stats.ingested, stats.duplicates, stats.drops_waiting) == (0, 1, 0)
    assert one(home, "SELECT count(*) FROM instances") == 3
    assert sources(home.drops) == []


def test_scan_resumes_only_what_the_catalog_accounts_for(home: Home, rng: random.Random) -> None:
    """A listed file that is missing and that the catalog does not know still holds the drop."""
    _, files = study_drop(rng, 3)
    samples.write_drop(home.drops, "fac-a", "d1", files)
    run(home)
    _, other = study_drop(rng, 3)
    names = sorted(files)
    # d2 lists one file the catalog has (from d1) and one it has never seen; both absent.
    listed = {"x.dcm": files[names[0]], "y.dcm": other[sorted(other)[0]], "z.dcm": b"z"}
    samples.write_drop(home.drops, "fac-a", "d2", {"z.dcm": b"z"}, listed=listed)
    scan = {
        d.folder: d
        for d in scan_drops(home.drops, home.pepper, time.time(), 0, 86400, home.catalog)
    }
    assert scan["fac-a/d2"].state == "waiting"
    home.drops.delete("fac-a/d2/manifest.json")
    del listed["y.dcm"]
    samples.write_drop(home.drops, "fac-a", "d2", {"z.dcm": b"z"}, listed=listed)
    assert {d.folder: d for d in scan_drops(home.drops, home.pepper, time.time(), 0, 86400)}[
        "fac-a/d2"
    ].state == "waiting"  # without the catalog nothing can account for x.dcm
    scan = {
        d.folder: d
        for d in scan_drops(home.drops, home.pepper, time.time(), 0, 86400, home.catalog)
    }
    assert scan["fac-a/d2"].state == "ready"


@pytest.mark.parametrize("group", [1, reconcile.FULL_PASS_GROUP])
def test_reconcile_removes_orphans_only(
    home: Home, rng: random.Random, group: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reconcile, "FULL_PASS_GROUP", group)  # 1: a catalog query per folder
    _, files = study_drop(rng, 2)
    samples.write_drop(home.drops, "fac-a", "d1", files)
    run(home)
    home.vault.put_bytes("ab/orphan.dvlt", b"DVLT leftover")
    home.vault.put_bytes("stray.dvlt", b"DVLT leftover at the root")
    stats = reconcile_vault(home=home, min_age_seconds=0)
    assert stats.vault_orphans_removed == 2 and stats.vault_checked == 4
    assert len(home.vault.list()) == 2


def test_reconcile_keeps_every_object_of_a_home_moved_to_another_path(
    local_home: Home, rng: random.Random, tmp_path: Path
) -> None:
    """Outside review: a home copied to another path lost its whole vault to the next
    reconcile (rows keep the URL they were written at). Rows of a URL the home no longer
    has still claim their objects; a true orphan still goes."""
    import shutil

    _, files = study_drop(rng, 3)
    samples.write_drop(local_home.drops, "fac-a", "d1", files)
    run(local_home)
    moved_root = tmp_path / "moved" / "home"
    shutil.copytree(tmp_path / "home", moved_root)
    moved = Home.local(moved_root)
    moved.catalog = local_home.catalog  # the same rows, which name the old path
    moved.vault.put_bytes("ab/orphan.dvlt", b"DVLT leftover")
    stats = reconcile_vault(home=moved, min_age_seconds=0)
    assert stats.vault_orphans_removed == 1
    assert len(moved.vault.list()) == 3


def _pending(home: Home) -> list[dict[str, list[str]]]:
    return [json.loads(home.vault.read_bytes(e.name)) for e in home.vault.list(PENDING)]


def test_a_stopped_batch_is_cleaned_up_by_the_next_run_without_a_full_listing(
    home: Home, rng: random.Random, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, files = study_drop(rng, 3)
    files["bad.txt"] = samples.not_dicom()
    samples.write_drop(home.drops, "fac-a", "d1", files)

    def boom() -> None:
        raise RuntimeError("injected crash")

    monkeypatch.setitem(ingest_mod.FAULTS, "after_vault_write", boom)
    monkeypatch.setattr(
        flows_ingest, "ingest_batch_task", ingest_mod.ingest_batch_task.with_options(retries=0)
    )
    with pytest.raises(RuntimeError, match="injected crash"):
        run(home)
    monkeypatch.delitem(ingest_mod.FAULTS, "after_vault_write")
    # The stopped batch named every object it wrote, before writing it.
    [record] = _pending(home)
    written = sorted(e.name for e in home.vault.list() if not e.name.startswith(PENDING))
    assert sorted(record["vault"]) == written and len(written) == 3
    assert [e.name for e in home.quarantine.list()] == [
        record["quarantine"][0],
        record["quarantine"][0].replace(".dvlt", ".json"),
    ]
    home.vault.put_bytes("cd/stray.dvlt", b"DVLT not named by any record")

    stats = run(home)
    assert stats.ingested == 3 and sum(stats.quarantined.values()) == 1
    assert _pending(home) == []
    rows = home.catalog.query("SELECT name FROM objects WHERE kind = 'instance'")["name"]
    stored = {e.name for e in home.vault.list()}
    assert set(record["vault"]).isdisjoint(stored)  # the stopped batch's copies are gone
    assert stored == {*rows, "cd/stray.dvlt"}  # the run did not look beyond its records
    # The quarantined file was written again under the same name and cataloged: kept.
    [quarantined] = record["quarantine"]
    assert one(home, "SELECT name FROM objects WHERE kind = 'quarantine'") == quarantined
    assert home.quarantine.exists(quarantined)
    # The daily full pass finds what no record names.
    assert reconcile_vault(home=home, min_age_seconds=0).vault_orphans_removed == 1
    assert {e.name for e in home.vault.list()} == set(rows)


def test_a_pending_record_does_not_take_an_object_a_rerun_is_rewriting(
    local_home: Home, rng: random.Random
) -> None:
    home = local_home
    home.catalog.migrate()
    name = "fac-a/d1/q_rewritten.dvlt"
    record = record_pending(home, ["ab/gone.dvlt"], [name])
    assert record is not None
    hour_ago = time.time() - 3600
    os.utime(home.vault.path(record), (hour_ago, hour_ago))
    home.quarantine.put_bytes(name, b"DVLT being rewritten, not yet cataloged")
    stats = settle_pending(home, min_age_seconds=60)
    assert home.quarantine.exists(name)  # young: a batch in flight may commit it
    assert (stats.pending_settled, stats.quarantine_orphans_removed) == (1, 0)
    assert _pending(home) == []


def test_no_phi_in_vault_or_catalog(home: Home, rng: random.Random) -> None:
    patient = samples.make_patient(rng, 42)
    study_uid, files = samples.make_study(rng, patient, 3, "MR_small.dcm")
    samples.write_drop(home.drops, "fac-a", "d1", files)
    bad = samples.truncated(next(iter(files.values())))
    samples.write_drop(home.drops, "fac-a", "d2", {"cut.dcm": bad})
    run(home)
    needles = [
        patient.patient_id.encode(),
        patient.name.encode(),
        patient.name.split("^")[0].encode(),
    ]
    home.catalog.checkpoint()
    blobs = [data for _, data in home.catalog.stored_files()]
    blobs += [loc.read_bytes(e.name) for loc in (home.vault, home.quarantine) for e in loc.list()]
    for blob in blobs:
        for needle in needles:
            assert needle not in blob


def test_progress_is_reported_per_batch(local_home: Home, rng: random.Random) -> None:
    for i in range(3):
        _, files = study_drop(rng, 2, "MR_small.dcm")
        samples.write_drop(local_home.drops, "fac-a", f"p{i}", files)
    calls: list[tuple[int, int]] = []
    ingest_drops(
        home=local_home,
        settings=Settings.load(quiet_seconds=0, batch_files=2),
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(2, 6), (4, 6), (6, 6)]


def test_an_unreadable_pending_record_is_dropped_and_the_run_goes_on(
    home: Home, rng: random.Random
) -> None:
    home.vault.put_bytes(f"{PENDING}/cut.json", b'{"vault": ["ab/x.dv')
    _, files = study_drop(rng, 1)
    samples.write_drop(home.drops, "fac-a", "d1", files)
    assert run(home).ingested == 1
    assert home.vault.list(PENDING) == []  # the full pass finds whatever it named
