"""Deletion leaves nothing (issue #18): after a sweep, a byte scan of every file of the home
and of Prefect's database finds no identifier of the deleted study, whatever happened to
it first (shares, a revoke, a disclosure, an incident, a quarantined copy, a late file,
a share request that arrives after the deletion), on file:// and on moto's versioned S3.
"""

from __future__ import annotations

import io
import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fsspec.asyn import sync
from prefect.logging.handlers import APILogHandler
from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

from dropvault.flows.deletion import deletion_sweep
from dropvault.flows.ingest import ingest_drops
from dropvault.flows.settings import Settings
from dropvault.flows.sharing import apply_share_manifests, report_wrong_access
from dropvault.storage.home import LOCATIONS, Home
from dropvault.storage.locations import Location
from dropvault.tasks import samples
from dropvault.tasks.deletion import CatalogScanFailed
from dropvault.tasks.drop_names import drops_list
from dropvault.tasks.incidents import file_incident_request
from dropvault.tasks.phi import tombstone_ref
from dropvault.tasks.quarantine import quarantine_export
from tests.conftest import VERSIONED_BUCKET, make_home

NOW = datetime.now(UTC)
QUIET = Settings(quiet_seconds=0)


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.integration)])
def dhome(request: pytest.FixtureRequest, tmp_path: Path) -> Home:
    """A home on file://, or on moto S3 with a *versioned* bucket."""
    if request.param == "file":
        return make_home("file", tmp_path)
    endpoint = request.getfixturevalue("moto_endpoint")
    return make_home("s3", tmp_path, endpoint, bucket=VERSIONED_BUCKET)


def every_version(loc: Location) -> list[tuple[str, bytes]]:
    """Every object of a location, and on a versioned bucket every version of each."""
    if loc.protocol != "s3":
        return [(e.name, loc.read_bytes(e.name, unchecked=True)) for e in loc.list()]
    bucket, prefix = loc.root.split("/", 1)
    fs: Any = loc.fs
    found = []
    pages = sync(fs.loop, fs._call_s3, "list_object_versions", Bucket=bucket, Prefix=prefix)
    for v in pages.get("Versions", []):
        body = sync(
            fs.loop,
            fs._call_s3,
            "get_object",
            Bucket=bucket,
            Key=v["Key"],
            VersionId=v["VersionId"],
        )
        found.append((v["Key"], sync(fs.loop, body["Body"].read)))
    return found


def prefect_database() -> bytes:
    APILogHandler().flush()
    path = Path(PREFECT_API_DATABASE_CONNECTION_URL.value().split("///", 1)[1])
    return b"".join(
        p.read_bytes() for p in (path, path.with_name(path.name + "-wal")) if p.exists()
    )


def everything(
    home: Home, tmp_path: Path, request: pytest.FixtureRequest
) -> list[tuple[str, bytes]]:
    """Every byte the home keeps: local files (catalog, WAL, keystore, keys), every object
    and version of every location, the catalog's stored files (a lake's Parquet files and
    a dump of its metadata database), and Prefect's database."""
    blobs = [(str(p), p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()]
    if home.catalog.lake is not None:
        postgres = request.getfixturevalue("postgres")
        blobs.append(("lake metadata (pg_dump)", postgres.dump(schema=home.catalog.lake.schema)))
        # Dead tuples too. Not scanned, and documented: the WAL, and pg_statistic (column
        # statistics sample metadata values; a study's UID can stay there until the next
        # ANALYZE of the table after the sweep).
        blobs += [b for b in postgres.heap_files() if "(pg_statistic" not in b[0]]
    for name in LOCATIONS:
        loc = getattr(home, name)
        if not loc.is_local:
            blobs += every_version(loc)
    home.catalog.drop_reader()
    blobs += list(home.catalog.stored_files())
    blobs.append(("prefect database", prefect_database()))
    return blobs


def share_rows(owner: str, uid: str, prefix: str = "s", quote: str = "") -> str:
    rows = [
        {
            "request_id": "s1",
            "action": "share",
            "grantee": "dr:x",
            "days": -3,
            "purpose": "on UID." + quote,
        },
        {"request_id": "s2", "action": "share", "grantee": "dr:y", "days": -3},
        {"request_id": "s3", "action": "revoke", "grantee": "dr:y", "days": -2},
        {
            "request_id": "s4",
            "action": "disclose",
            "grantee": "insurer:z",
            "days": -2,
            "purpose": "billing",
        },
    ]
    return "".join(
        json.dumps(
            {
                "owner": owner,
                "study_uid": uid,
                **{k: str(v).replace("UID", uid) for k, v in r.items() if k != "days"},
                "request_id": prefix + str(r["request_id"]),
                "requested_at": (NOW + timedelta(days=float(str(r["days"])))).isoformat(),
            }
        )
        + "\n"
        for r in rows
    )


@pytest.mark.usefixtures("run_logs_at_debug")
def test_a_deleted_study_leaves_no_trace_anywhere(
    dhome: Home, rng: random.Random, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    home = dhome
    patient = samples.make_patient(rng, 7)
    uid, files = samples.make_study(rng, patient, 2, "MR_small.dcm")
    first = next(iter(files.values()))
    header = pydicom.dcmread(io.BytesIO(first), stop_before_pixels=True)
    series_uid = str(header.SeriesInstanceUID)
    sop_uids = [samples.sop_uid(d) for d in files.values()]
    folder = f"DOE_{patient.patient_id}"
    samples.write_drop(home.drops, "fac", folder, files, owners={uid: "user:ann"})
    kept_uid, kept_files = samples.make_study(rng, samples.make_patient(rng, 8), 1, "MR_small.dcm")
    samples.write_drop(home.drops, "fac", "other", kept_files, owners={kept_uid: "user:ben"})
    ingest_drops(home=home, settings=QUIET)
    # A conflicting copy and a truncated copy of one image are quarantined; both name the
    # study (the truncated one through its header's first bytes).
    conflict = samples.with_uid(first, sop_uids[0], tweak=b"x")
    again = {"c.dcm": conflict, "t.dcm": samples.truncated(first)}
    samples.write_drop(home.drops, "fac", f"{folder}_again", again, manifest=False)
    ingest_drops(home=home, settings=QUIET)
    named = home.catalog.query("SELECT reason, study_uid FROM quarantine ORDER BY reason")
    assert named.values.tolist() == [["truncated", uid], ["uid_conflict", uid]]
    # Shares, a revoke and a disclosure; an incident with its worksheet.
    # A purpose that quotes the series, an image and the patient (as an owner would type).
    family, given = patient.name.split("^")[:2]
    quote = (
        f" Series {series_uid}, image {sop_uids[0]}, for {given} {family} ({patient.patient_id})"
    )
    home.manifests.put_bytes("shares/s.jsonl", share_rows("user:ann", uid, quote=quote).encode())
    apply_share_manifests(home=home)
    filed = file_incident_request(home.manifests, "dr:x", uid, NOW - timedelta(hours=1))
    report_wrong_access(filed, home=home)
    qid = home.catalog.query("SELECT quarantine_id FROM quarantine")["quarantine_id"][0]
    quarantine_export(home, qid, tmp_path / "review" / "q.dcm")  # an operator's review
    (tmp_path / "review" / "q.dcm").unlink()

    # The scan sees what it looks for: the UID is in the catalog and the manifests now, and
    # Prefect's database holds these runs.
    before = everything(home, tmp_path, request)
    assert sum(uid.encode() in data for _, data in before) >= 3
    assert b"report-wrong-access" in dict(before)["prefect database"]

    if home.catalog.lake is not None:
        # As autovacuum does at its own time: column statistics that sample the UID.
        request.getfixturevalue("postgres").psql("ANALYZE")
    deletion = {
        "request_id": "del-1",
        "owner": "user:ann",
        "study_uid": uid,
        "requested_at": (NOW - timedelta(hours=1)).isoformat(),
    }
    home.manifests.put_bytes("deletions/d.jsonl", (json.dumps(deletion) + "\n").encode())
    result = deletion_sweep(home=home)
    assert result.summary()["studies_deleted"] == 1 and result.summary()["all_verified"]

    # After the deletion: late images of the study (whole, truncated, one whose manifest
    # checksum is wrong), a share naming it, a share of another study whose purpose quotes
    # it, and an incident about it arrive.
    late = samples.make_instance(patient, uid, series_uid, "MR_small.dcm")
    lates = {"late.dcm": late, "cut.dcm": samples.truncated(late)}
    samples.write_drop(home.drops, "fac", f"{folder}_late", lates, manifest=False)
    other = samples.with_uid(late, sop_uids[1] + ".9")
    listed = {"m.dcm": other[:-1] + bytes([other[-1] ^ 1])}  # same size, other checksum
    samples.write_drop(home.drops, "fac", f"{folder}_sum", {"m.dcm": other}, listed=listed)
    stats = ingest_drops(home=home, settings=QUIET)
    assert dict(stats.quarantined) == {"deleted_by_owner": 3}
    quote = {
        "request_id": "q1",
        "action": "share",
        "owner": "user:ben",
        "grantee": "dr:q",
        "study_uid": kept_uid,
        "purpose": f"compare with {uid}",
        "requested_at": NOW.isoformat(),
    }
    home.manifests.put_bytes("shares/quote.jsonl", (json.dumps(quote) + "\n").encode())
    apply_share_manifests(home=home)
    late_incident = file_incident_request(home.manifests, "dr:x", uid, NOW)
    with pytest.raises(LookupError):
        report_wrong_access(late_incident, home=home)
    assert drops_list(home, names=True).set_index("drop_id")["name"].isna().sum() >= 1
    home.manifests.put_bytes("shares/late.jsonl", share_rows("user:ann", uid, "late-").encode())
    shared = apply_share_manifests(home=home)
    assert shared.summary()["rejected_by_reason"] == {"study_deleted": 4}
    deletion_sweep(home=home)  # a later sweep: compacts what the late rows left

    needles = {
        "study UID": uid,
        "series UID": series_uid,
        **{f"SOP UID {i}": s for i, s in enumerate(sop_uids)},
        "patient name": patient.name,
        "patient name as typed": f"{given} {family}",
        "patient ID": patient.patient_id,
        "drop name": folder,
    }
    leaks = [
        f"{what} in {where}"
        for where, data in everything(home, tmp_path, request)
        for what, needle in needles.items()
        if needle.encode() in data
    ]
    assert leaks == []
    # The history is kept, under the tombstone key.
    ref = tombstone_ref(home.pepper, uid)
    for table in ("grant_events", "grants", "disclosures", "incidents", "share_requests"):
        n = home.catalog.query(f"SELECT count(*) AS n FROM {table} WHERE study_uid = ?", [ref])  # noqa: S608
        assert n["n"][0] > 0, table
    report = home.catalog.query("SELECT report_md FROM incidents")["report_md"][0]
    assert ref in report
    # The other patient's study is untouched, in rows and in files.
    assert (
        home.catalog.query("SELECT count(*) AS n FROM studies WHERE study_uid = ?", [kept_uid])[
            "n"
        ][0]
        == 1
    )


def test_a_sweep_whose_catalog_scan_fails_is_not_verified_and_a_rerun_finishes(
    local_home: Home, rng: random.Random, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compaction that leaves the bytes (a fault injected into it; the scan is real): the
    request is ``failed``, not verified, and the next sweep compacts, scans and verifies."""
    home = local_home
    uid, files = samples.make_study(rng, samples.make_patient(rng, 1), 1, "MR_small.dcm")
    samples.write_drop(home.drops, "fac", "d", files, owners={uid: "user:ann"})
    ingest_drops(home=home, settings=QUIET)
    deletion = {
        "request_id": "del-1",
        "owner": "user:ann",
        "study_uid": uid,
        "requested_at": NOW.isoformat(),
    }
    home.manifests.put_bytes("deletions/d.jsonl", (json.dumps(deletion) + "\n").encode())
    monkeypatch.setattr(type(home.catalog), "compact", lambda self: None)
    with pytest.raises(CatalogScanFailed):
        deletion_sweep(home=home)
    with pytest.raises(CatalogScanFailed):  # a rerun scans for the sealed UIDs again
        deletion_sweep(home=home)
    assert home.catalog.query("SELECT count(*) AS n FROM deletion_scans")["n"][0] == 1
    row = home.catalog.query("SELECT status, outcome, verified_at FROM deletion_requests")
    assert row[["status", "outcome"]].values.tolist() == [["failed", "failed:catalog_scan"]]
    assert row["verified_at"].isna().all()
    assert home.catalog.query("SELECT sla_state FROM deletion_sla")["sla_state"][0] != "completed"
    monkeypatch.undo()
    deletion_sweep(home=home)
    row = home.catalog.query("SELECT status, outcome, verified_at FROM deletion_requests")
    assert row[["status", "outcome"]].values.tolist() == [["completed", "applied"]]
    assert row["verified_at"].notna().all()
    assert not home.catalog.holds([uid])
    assert home.catalog.query("SELECT count(*) AS n FROM deletion_scans")["n"][0] == 0


def test_an_archived_study_deleted_later_loses_its_archive_copy(
    dhome: Home, rng: random.Random, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    home = dhome
    patient = samples.make_patient(rng, 3)
    uid, files = samples.make_study(rng, patient, 2, "MR_small.dcm")
    samples.write_drop(home.drops, "fac", "d", files, owners={uid: "user:cat"})
    ingest_drops(home=home, settings=QUIET)

    def delete(rid: str, keep: bool) -> dict[str, Any]:
        row = {
            "request_id": rid,
            "owner": "user:cat",
            "study_uid": uid,
            "requested_at": NOW.isoformat(),
            "keep_archive": str(keep).lower(),
        }
        home.manifests.put_bytes(f"deletions/{rid}.jsonl", (json.dumps(row) + "\n").encode())
        return deletion_sweep(home=home).summary()

    assert delete("arch-1", keep=True)["studies_archived"] == 1
    assert len(home.archive.list()) == 2
    summary = delete("del-2", keep=False)
    assert (summary["studies_deleted"], summary["objects"], summary["all_verified"]) == (1, 2, True)
    assert home.archive.list() == []
    assert every_version(home.archive) == []
    assert home.catalog.query("SELECT count(*) AS n FROM studies")["n"][0] == 0
    leaks = [
        w for w, data in everything(home, tmp_path, request) if patient.patient_id.encode() in data
    ]
    assert leaks == []


def test_a_sweep_killed_after_the_rows_went_is_verified_only_by_a_real_scan(
    local_home: Home, rng: random.Random, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after the study's rows were deleted, before compaction: the rerun still knows
    the UIDs (sealed in deletion_scans at mark time) and scans for them before verifying."""
    import dropvault.flows.deletion as flows_deletion
    from dropvault.tasks import deletion as deletion_mod

    home = local_home
    uid, files = samples.make_study(rng, samples.make_patient(rng, 1), 1, "MR_small.dcm")
    samples.write_drop(home.drops, "fac", "d", files, owners={uid: "user:ann"})
    ingest_drops(home=home, settings=QUIET)
    row = {"request_id": "del-1", "owner": "user:ann", "study_uid": uid}
    row["requested_at"] = NOW.isoformat()
    home.manifests.put_bytes("deletions/d.jsonl", (json.dumps(row) + "\n").encode())

    def killed() -> None:
        raise RuntimeError("killed after the rows went")

    monkeypatch.setitem(deletion_mod.FAULTS, "after_finish", killed)
    monkeypatch.setattr(
        flows_deletion,
        "sweep_requests_task",
        deletion_mod.sweep_requests_task.with_options(retries=0),
    )
    with pytest.raises(RuntimeError, match="killed"):
        deletion_sweep(home=home)
    assert home.catalog.query("SELECT count(*) AS n FROM studies")["n"][0] == 0
    monkeypatch.delitem(deletion_mod.FAULTS, "after_finish")
    monkeypatch.setattr(type(home.catalog), "compact", lambda self: None)  # bytes stay
    with pytest.raises(CatalogScanFailed):  # the rerun scans: the UID is found, not verified
        deletion_sweep(home=home)
    monkeypatch.undo()
    deletion_sweep(home=home)
    done = home.catalog.query("SELECT status, verified_at FROM deletion_requests")
    assert done["status"].tolist() == ["completed"] and done["verified_at"].notna().all()
    assert not home.catalog.holds([uid])
