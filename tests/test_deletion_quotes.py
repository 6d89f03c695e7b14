"""Deletion leaves nothing (issue #18) of what requesters type: a patient's name or ID in
a purpose (any common spelling, JSON escapes, a CSV record over two lines), in a
manifest's name, in a request id; a manifest whose name quotes the UID and holds a bad
row; a manifest that goes away between listing and reading; a copy of an image filed
under another, live study. After the sweep no byte of the home, nor Prefect's database,
holds the study's UIDs or its patient."""

from __future__ import annotations

import io
import json
import random
import re
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest

from dropvault.flows.deletion import deletion_sweep
from dropvault.flows.ingest import ingest_drops
from dropvault.flows.settings import Settings
from dropvault.flows.sharing import apply_share_manifests
from dropvault.storage.home import Home
from dropvault.tasks import samples
from tests.conftest import make_home
from tests.test_deletion_traces import prefect_database

QUIET = Settings(quiet_seconds=0)
NOW = datetime.now(UTC).isoformat()
PATIENT = samples.Patient(patient_id="MRN28034063", name="MÜLLER^ADA^7", birth_date="19700101")


def _unescaped(blob: bytes) -> str:
    text = blob.decode("utf-8", "replace")
    return text + re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), text)


def _leaks(home: Home, tmp_path: Path, needles: dict[str, str]) -> list[str]:
    home.catalog.drop_reader()
    blobs = [(str(p), p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()]
    blobs += list(home.catalog.stored_files())
    blobs.append(("prefect database", prefect_database()))
    found = []
    for where, blob in blobs:
        text = _unescaped(blob).casefold() + where.casefold()
        found += [f"{what} in {where}" for what, n in needles.items() if n.casefold() in text]
    return found


def _share(request_id: str, uid: str, owner: str = "user:ann", **extra: str) -> dict[str, str]:
    return {
        "request_id": request_id,
        "action": "share",
        "owner": owner,
        "grantee": "dr:" + request_id,
        "study_uid": uid,
        "requested_at": NOW,
        **extra,
    }


def _lines(*rows: dict[str, str]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.mark.usefixtures("run_logs_at_debug")
def test_what_requesters_typed_about_a_deleted_study_goes_with_it(tmp_path: Path) -> None:
    home = make_home("file", tmp_path)
    uid, files = samples.make_study(random.Random(5), PATIENT, 2, "MR_small.dcm")
    first = next(iter(files.values()))
    header = pydicom.dcmread(io.BytesIO(first), stop_before_pixels=True)
    samples.write_drop(home.drops, "fac", "plain", files, owners={uid: "user:ann"})
    ingest_drops(home=home, settings=QUIET)
    family, given = "MÜLLER", "ADA"
    escaped = "".join(f"\\u{ord(c):04x}" for c in uid)
    manifests = {
        # a portal names the manifest after the patient; purposes in the usual spellings
        "shares/MULLER_ADA.jsonl": _lines(
            _share("p1", uid, purpose=f"for {family} {given}"),
            _share("p2", uid, purpose=f"for {family}, {given}"),
            _share("p3", uid, purpose=f"second opinion for {given} {family}"),  # \u00dc
        ),
        f"shares/{family}_{given}.jsonl": _lines(_share("p4", uid, purpose="x")),
        # the UID spelled with JSON escapes: the same study once parsed
        "shares/b.jsonl": (
            '{"request_id": "p5", "action": "share", "owner": "user:ann", "grantee": "dr:c",'
            f' "study_uid": "{escaped}", "requested_at": "{NOW}",'
            f' "purpose": "for {given} {family} ({PATIENT.patient_id})"}}\n'
        ).encode(),
        # a quoted CSV purpose over two physical lines, the UID on the first only
        "shares/c.csv": (
            "request_id,action,owner,grantee,study_uid,requested_at,purpose\r\n"
            f'p6,disclose,user:ann,court:x,{uid},{NOW},"subpoena\nfor {given} {family}"\r\n'
        ).encode(),
        # the manifest's name quotes the UID and one of its rows is bad: the rejected
        # row's id is "<manifest>#<line>"
        f"shares/study-{uid}.jsonl": _lines(
            _share("p7", uid), _share("p8", uid, requested_at="yesterday")
        ),
    }
    for name, data in manifests.items():
        home.manifests.put_bytes(name, data)
    # a request id quoting the patient's ID is refused, the rest of its manifest applies
    home.manifests.put_bytes(
        "shares/ids.jsonl",
        _lines(_share(f"share-{PATIENT.patient_id}", uid), _share("p9", uid)),
    )
    result = apply_share_manifests(home=home).summary()
    assert result["rejected_by_reason"] == {"phi_in_name": 1, "bad_timestamp": 1, "malformed": 1}
    # a deletion manifest whose name quotes the UID is gone before it is read (a link to
    # nothing): intake goes on and never names it
    (tmp_path / "home" / "manifests" / "deletions").mkdir(parents=True, exist_ok=True)
    (tmp_path / "home" / "manifests" / "deletions" / f"{uid}.jsonl").symlink_to(
        tmp_path / "gone.jsonl"
    )
    deletion = {
        "request_id": "del-1",
        "owner": "user:ann",
        "study_uid": uid,
        "requested_at": NOW,
    }
    home.manifests.put_bytes(f"deletions/{given}_{family}.jsonl", _lines(deletion))
    summary = deletion_sweep(home=home, settings=QUIET).summary()
    assert summary["studies_deleted"] == 1 and summary["all_verified"]
    (tmp_path / "home" / "manifests" / "deletions" / f"{uid}.jsonl").unlink()
    needles = {
        "study UID": uid,
        "series UID": str(header.SeriesInstanceUID),
        **{f"SOP UID {i}": samples.sop_uid(d) for i, d in enumerate(files.values())},
        "patient ID": PATIENT.patient_id,
        "family given": f"{family} {given}",
        "family, given": f"{family}, {given}",
        "given family": f"{given} {family}",
        "family_given": f"{family}_{given}",
        "given_family": f"{given}_{family}",
        "DICOM name": PATIENT.name,
    }
    assert _leaks(home, tmp_path, needles) == []
    # The request history stays, and the results files are still beside their manifests.
    processed = sorted(e.name for e in home.manifests.list("shares/processed"))
    assert len(processed) == 2 * len({*manifests, "shares/ids.jsonl"})
    assert all(n.endswith(".results.jsonl") or n + ".results.jsonl" in processed for n in processed)
    n = home.catalog.query("SELECT count(*) AS n FROM share_requests")["n"][0]
    assert n == 10


def test_a_changed_copy_filed_under_a_live_study_goes_with_the_deleted_one(
    tmp_path: Path,
) -> None:
    home = make_home("file", tmp_path)
    rng = random.Random(6)
    a_uid, a_files = samples.make_study(rng, PATIENT, 1, "MR_small.dcm")
    other = samples.make_patient(rng, 2)
    b_uid, b_files = samples.make_study(rng, other, 1, "MR_small.dcm")
    samples.write_drop(home.drops, "fac", "a", a_files, owners={a_uid: "user:ann"})
    samples.write_drop(home.drops, "fac", "b", b_files, owners={b_uid: "user:ann"})
    ingest_drops(home=home, settings=QUIET)
    # A's image re-sent under B's study UID, content changed, A's SOP Instance UID kept.
    a_image = next(iter(a_files.values()))
    ds = pydicom.dcmread(io.BytesIO(a_image))
    ds.StudyInstanceUID = b_uid
    ds.InstitutionName = "changed"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    samples.write_drop(home.drops, "fac", "again", {"x.dcm": out.getvalue()}, manifest=False)
    ingest_drops(home=home, settings=QUIET)
    q = home.catalog.query("SELECT reason, study_uid FROM quarantine")
    assert q.values.tolist() == [["uid_conflict", b_uid]]
    deletion = {"request_id": "d", "owner": "user:ann", "study_uid": a_uid, "requested_at": NOW}
    home.manifests.put_bytes("deletions/d.jsonl", _lines(deletion))
    assert deletion_sweep(home=home, settings=QUIET).summary()["all_verified"]
    assert home.catalog.query("SELECT count(*) AS n FROM quarantine")["n"][0] == 0
    live = home.catalog.query("SELECT study_uid FROM studies")["study_uid"].tolist()
    assert live == [b_uid]
    assert _leaks(home, tmp_path, {"A's patient": PATIENT.patient_id, "A": a_uid}) == []


def test_a_deletion_leaves_other_patients_text_alone_and_odd_rows_do_not_stop_it(
    tmp_path: Path,
) -> None:
    home = make_home("file", tmp_path)
    lee_a = samples.Patient(patient_id="MRN11112222", name="LEE^ANN", birth_date="19600101")
    lee_b = samples.Patient(patient_id="MRN33334444", name="LEE^ANN", birth_date="19700101")
    a_uid = "1.2.826.0.1.3680043.8.498.4242"
    b_uid = a_uid + "1"  # another study, whose UID the deleted one prefixes
    a_files = {"a.dcm": samples.make_instance(lee_a, a_uid, a_uid + ".1", "MR_small.dcm")}
    b_files = {"b.dcm": samples.make_instance(lee_b, b_uid, b_uid + ".1", "MR_small.dcm")}
    samples.write_drop(home.drops, "fac", "a", a_files, owners={a_uid: "user:ann"})
    samples.write_drop(home.drops, "fac", "b", b_files, owners={b_uid: "user:bob"})
    ingest_drops(home=home, settings=QUIET)
    bob = _share("b1", b_uid, owner="user:bob", purpose="second opinion for LEE ANN")
    home.manifests.put_bytes("shares/bob-ann-lee.jsonl", _lines(bob))
    # A lone surrogate escaped in a row of the owner's manifest: refused, archived as is.
    odd = '{"request_id": "a2", "purpose": "\\ud800", "study_uid": "' + a_uid + '"}\n'
    home.manifests.put_bytes("shares/a.jsonl", _lines(_share("a1", a_uid)) + odd.encode())
    apply_share_manifests(home=home)
    kept = home.manifests.read_bytes("shares/processed/bob-ann-lee.jsonl")
    deletion = {"request_id": "d", "owner": "user:ann", "study_uid": a_uid, "requested_at": NOW}
    home.manifests.put_bytes("deletions/d.jsonl", _lines(deletion))
    summary = deletion_sweep(home=home, settings=QUIET).summary()
    assert summary["studies_deleted"] == 1 and summary["all_verified"]
    assert home.manifests.read_bytes("shares/processed/bob-ann-lee.jsonl") == kept
    purpose = home.catalog.query(
        "SELECT purpose, outcome FROM share_requests WHERE request_id = 'b1'"
    )
    assert purpose.values.tolist() == [["second opinion for LEE ANN", "applied"]]
    assert a_uid.encode() not in home.manifests.read_bytes("shares/processed/a.jsonl")
