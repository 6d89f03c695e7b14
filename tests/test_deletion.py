"""Deletion sweeps: proof of deletion, archive election, races, resume, SLA, rejections."""

from __future__ import annotations

import json
import random
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import dropvault.flows.deletion as flows_deletion
from dropvault.flows.deletion import DeletionSLABreached, deletion_sweep
from dropvault.flows.sharing import apply_share_manifests
from dropvault.storage.home import Home
from dropvault.tasks import deletion as deletion_mod
from dropvault.tasks import samples
from dropvault.tasks.drops import scan_drops
from dropvault.tasks.exports import ExportError, export_instance
from dropvault.tasks.ingest import ingest_batch
from dropvault.tasks.sharing import access_list, who_can_access
from tests.conftest import VERSIONED_BUCKET, make_home

NOW = datetime.now(UTC)


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.integration)])
def dhome(request: pytest.FixtureRequest, tmp_path: Path) -> Home:
    """A home on file://, or on moto S3 with a *versioned* bucket."""
    if request.param == "file":
        return make_home("file", tmp_path)
    endpoint = request.getfixturevalue("moto_endpoint")
    return make_home("s3", tmp_path, endpoint, bucket=VERSIONED_BUCKET)


def ingest_all(home: Home) -> None:
    home.catalog.migrate()
    for drop in scan_drops(home.drops, home.pepper, time.time(), 0, 86400):
        ingest_batch(home, [(drop, f) for f in drop.files], max_file_bytes=10**9)


def add_patient(
    home: Home, rng: random.Random, owner: str, n: int = 2
) -> tuple[samples.Patient, str, dict[str, bytes]]:
    patient = samples.make_patient(rng, rng.randrange(10**6))
    uid, files = samples.make_study(rng, patient, n, "MR_small.dcm")
    samples.write_drop(home.drops, "fac", f"d-{rng.randrange(10**9)}", files, owners={uid: owner})
    return patient, uid, files


def request_deletion(home: Home, name: str, rows: list[dict[str, object]]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    home.manifests.put_bytes(f"deletions/{name}", text.encode())


def deletion(
    rid: str, owner: str, study: str, hours_ago: float = 1, keep: bool = False
) -> dict[str, object]:
    return {
        "request_id": rid,
        "owner": owner,
        "study_uid": study,
        "requested_at": (NOW - timedelta(hours=hours_ago)).isoformat(),
        "keep_archive": "true" if keep else "false",
    }


def all_home_bytes(home: Home, local_root: Path) -> list[tuple[str, bytes]]:
    """Every file of the home: local files (catalog, WAL, keystore) and every object version."""
    blobs = [(str(p), p.read_bytes()) for p in local_root.rglob("*") if p.is_file()]
    for loc in (home.vault, home.quarantine, home.archive, home.drops):
        if loc.protocol == "s3":
            bucket, prefix = loc.root.split("/", 1)
            from fsspec.asyn import sync

            fs = loc.fs
            resp = sync(fs.loop, fs._call_s3, "list_object_versions", Bucket=bucket, Prefix=prefix)
            for v in resp.get("Versions", []):
                body = sync(
                    fs.loop,
                    fs._call_s3,
                    "get_object",
                    Bucket=bucket,
                    Key=v["Key"],
                    VersionId=v["VersionId"],
                )
                data = sync(fs.loop, body["Body"].read)
                blobs.append((v["Key"], data))
        elif loc.protocol == "memory":
            blobs += [(e.name, loc.read_bytes(e.name)) for e in loc.list()]
    return blobs


def test_proof_of_deletion(
    dhome: Home, rng: random.Random, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    home = dhome
    gone, gone_uid, gone_files = add_patient(home, rng, "user:ann")
    kept, kept_uid, kept_files = add_patient(home, rng, "user:ben")
    ingest_all(home)
    # A conflicting copy of one of ann's images sits in quarantine, naming her study.
    first = next(iter(gone_files.values()))
    other = samples.with_uid(first, samples.sop_uid(first), tweak=b"x")
    samples.write_drop(home.drops, "fac", "late", {"x.dcm": other})
    ingest_all(home)
    assert (
        home.catalog.query("SELECT count(*) AS n FROM quarantine WHERE study_uid = ?", [gone_uid])[
            "n"
        ][0]
        == 1
    )
    home.manifests.put_bytes(
        "shares/s.jsonl",
        (
            json.dumps(
                {
                    "request_id": "s1",
                    "action": "share",
                    "owner": "user:ann",
                    "grantee": "dr:x",
                    "study_uid": gone_uid,
                    "requested_at": (NOW - timedelta(days=1)).isoformat(),
                }
            )
            + "\n"
        ).encode(),
    )
    apply_share_manifests(home=home)
    key_ids = home.catalog.query(
        "SELECT DISTINCT record_key_id FROM objects WHERE object_id IN"
        " (SELECT object_id FROM instances WHERE study_uid = ?"
        " UNION SELECT object_id FROM quarantine WHERE study_uid = ?)",
        [gone_uid, gone_uid],
    )["record_key_id"].tolist()
    wrapped = [home.keystore.wrapped_bytes(k) for k in key_ids]
    assert all(wrapped)
    vault_names = home.catalog.query(
        "SELECT name FROM objects o JOIN instances i USING (object_id) WHERE i.study_uid = ?",
        [gone_uid],
    )["name"].tolist()

    request_deletion(home, "del.jsonl", [deletion("del-1", "user:ann", gone_uid)])
    result = deletion_sweep(home=home)
    assert result.summary()["studies_deleted"] == 1 and result.summary()["all_verified"]

    needles = [gone.patient_id.encode(), gone.name.encode(), *[w for w in wrapped if w]]
    local_root = tmp_path
    for where, data in all_home_bytes(home, local_root):
        for needle in needles:
            assert needle not in data, where
    # The catalog's files at rest: the DuckDB file, or DuckLake's Parquet files and metadata.
    stored = list(home.catalog.stored_files())
    assert stored and not home.catalog.holds([gone_uid])
    if home.catalog.lake:
        assert any(name.endswith(".parquet") for name, _ in stored)
        dump = request.getfixturevalue("postgres").dump(schema=home.catalog.lake.schema)
        assert b"ducklake_snapshot" in dump and gone_uid.encode() not in dump
        assert kept_uid.encode() in dump or any(kept_uid.encode() in d for _, d in stored)
    # Every version of every former object is gone.
    for name in vault_names:
        if home.vault.protocol == "s3":
            assert home.vault.versions(name) == []
        assert not home.vault.exists(name)
    sla = home.catalog.query(
        "SELECT sla_state, verified_at FROM deletion_sla WHERE request_id = 'del-1'"
    )
    assert sla["sla_state"][0] == "completed" and sla["verified_at"].notna()[0]
    tomb = home.catalog.query("SELECT * FROM tombstones")
    assert (
        len(tomb) == 1
        and tomb["objects"][0] == 3
        and gone_uid not in json.dumps(tomb.astype(str).values.tolist())
    )
    assert who_can_access(home.catalog, gone_uid).empty
    with pytest.raises(ExportError):
        export_instance(home, samples.sop_uid(first), tmp_path / "x.dcm")
    # The other patient is untouched.
    data = next(iter(kept_files.values()))
    export_instance(home, samples.sop_uid(data), tmp_path / "kept.dcm")
    assert (tmp_path / "kept.dcm").read_bytes() == data
    assert kept_uid


def test_keep_archive(local_home: Home, rng: random.Random, tmp_path: Path) -> None:
    home = local_home
    _, uid, files = add_patient(home, rng, "user:cat")
    ingest_all(home)
    home.manifests.put_bytes(
        "shares/s.jsonl",
        (
            json.dumps(
                {
                    "request_id": "s1",
                    "action": "share",
                    "owner": "user:cat",
                    "grantee": "dr:y",
                    "study_uid": uid,
                    "requested_at": (NOW - timedelta(days=1)).isoformat(),
                }
            )
            + "\n"
        ).encode(),
    )
    apply_share_manifests(home=home)
    request_deletion(home, "a.jsonl", [deletion("arch-1", "user:cat", uid, keep=True)])
    result = deletion_sweep(home=home)
    assert result.summary()["studies_archived"] == 1
    assert home.vault.list() == [] and len(home.archive.list()) == 2
    data = next(iter(files.values()))
    export_instance(home, samples.sop_uid(data), tmp_path / "a.dcm")
    assert (tmp_path / "a.dcm").read_bytes() == data
    assert who_can_access(home.catalog, uid).empty
    assert access_list(home.catalog, "user:cat")["status"].tolist() == ["revoked"]
    assert home.catalog.query("SELECT status FROM studies")["status"].tolist() == ["archived"]


def test_tombstone_wins_over_a_drop_in_flight(local_home: Home, rng: random.Random) -> None:
    home = local_home
    patient, uid, files = add_patient(home, rng, "user:dan", n=1)
    ingest_all(home)
    request_deletion(home, "d.jsonl", [deletion("race-1", "user:dan", uid)])
    deletion_sweep(home=home)
    # A second image of the same study arrives after the deletion.
    late = samples.make_instance(patient, uid, "1.2.3.4.5.6", "MR_small.dcm")
    samples.write_drop(home.drops, "fac", "late", {"late.dcm": late})
    ingest_all(home)
    assert home.catalog.query("SELECT count(*) AS n FROM studies")["n"][0] == 0
    reasons = home.catalog.query("SELECT reason FROM quarantine")["reason"].tolist()
    assert reasons == ["deleted_by_owner"]


def test_interrupted_sweep_resumes(
    local_home: Home, rng: random.Random, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = local_home
    patient, uid, _ = add_patient(home, rng, "user:eve")
    add_patient(home, rng, "user:eve")
    ingest_all(home)
    request_deletion(home, "d.jsonl", [deletion("resume-1", "user:eve", "*")])

    def boom() -> None:
        raise RuntimeError("killed mid-study")

    monkeypatch.setitem(deletion_mod.FAULTS, "after_shred", boom)
    monkeypatch.setattr(
        flows_deletion,
        "sweep_requests_task",
        deletion_mod.sweep_requests_task.with_options(retries=0),
    )
    with pytest.raises(RuntimeError, match="killed"):
        deletion_sweep(home=home)
    assert home.catalog.query("SELECT status FROM deletion_requests")["status"].tolist() == [
        "pending"
    ]
    monkeypatch.delitem(deletion_mod.FAULTS, "after_shred")
    result = deletion_sweep(home=home)
    assert result.requests_done == 1
    assert home.catalog.query("SELECT count(*) AS n FROM studies")["n"][0] == 0
    assert home.vault.list() == []
    assert home.catalog.query("SELECT status FROM deletion_requests")["status"].tolist() == [
        "completed"
    ]


def test_breach_fails_the_run(local_home: Home, rng: random.Random) -> None:
    home = local_home
    _, uid, _ = add_patient(home, rng, "user:fay", n=1)
    ingest_all(home)
    request_deletion(home, "d.jsonl", [deletion("late-1", "user:fay", uid, hours_ago=30)])
    with pytest.raises(DeletionSLABreached, match="late-1"):
        deletion_sweep(home=home)
    sla = home.catalog.query("SELECT sla_state FROM deletion_sla")
    assert sla["sla_state"].tolist() == ["breached"]
    assert home.catalog.query("SELECT count(*) AS n FROM studies")["n"][0] == 0  # still deleted


def test_bad_rows_are_rejected_good_rows_proceed(local_home: Home, rng: random.Random) -> None:
    home = local_home
    _, uid, _ = add_patient(home, rng, "user:gus", n=1)
    _, other, _ = add_patient(home, rng, "user:hal", n=1)
    ingest_all(home)
    bad_time = deletion("b3", "user:gus", uid)
    bad_time["requested_at"] = "last tuesday"
    request_deletion(
        home,
        "d.jsonl",
        [
            deletion("ok", "user:gus", uid),
            deletion("b1", "user:gus", "1.2.3.404"),
            deletion("b2", "user:gus", other),
            bad_time,
            deletion("b4", "user:nobody", "*"),
            {"request_id": "b5", "owner": "user:gus"},
        ],
    )
    result = deletion_sweep(home=home)
    assert result.intake.rejected == {
        "unknown_study": 1,
        "not_owner": 1,
        "bad_timestamp": 1,
        "unknown_owner": 1,
        "missing_field": 1,
    }
    assert result.requests_done == 1
    assert home.catalog.query("SELECT study_uid FROM studies")["study_uid"].tolist() == [other]
    results = home.manifests.read_bytes("deletions/processed/d.jsonl.results.jsonl").decode()
    assert results.count("rejected:") == 5


def test_dry_run_deletes_nothing(local_home: Home, rng: random.Random) -> None:
    home = local_home
    _, uid, _ = add_patient(home, rng, "user:ivy")
    ingest_all(home)
    request_deletion(home, "d.jsonl", [deletion("dry-1", "user:ivy", uid)])
    result = deletion_sweep(home=home, dry_run=True)
    assert result.planned == [
        {
            "request_id": "dry-1",
            "action": "delete",
            "studies": 1,
            "instances": 2,
            "due_at": result.planned[0]["due_at"],
        }
    ]
    assert home.manifests.exists("deletions/d.jsonl")
    assert home.catalog.query("SELECT count(*) AS n FROM deletion_requests")["n"][0] == 0
    assert len(home.vault.list()) == 2


def test_sweep_progress_is_reported_per_batch(local_home: Home, rng: random.Random) -> None:
    from dropvault.flows.settings import Settings

    uids = [add_patient(local_home, rng, f"user:{i}")[1] for i in range(3)]
    ingest_all(local_home)
    request_deletion(
        local_home,
        "d.jsonl",
        [deletion(f"p{i}", f"user:{i}", uid) for i, uid in enumerate(uids)],
    )
    calls: list[tuple[int, int]] = []
    deletion_sweep(
        home=local_home,
        settings=Settings.load(sweep_batch=2),
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(2, 3), (3, 3)]
