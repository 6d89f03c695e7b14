"""Deletion leaves nothing (issue #18), for damaged copies: a copy of a study's image that
no parse can read to its StudyInstanceUID (cut before it, a malformed UID, VR UN, no
preamble, the UID past the first MiB, a deflated data set cut short) still carries the
patient's name. Its quarantined copy goes with the study (matched by any UID its bytes
name), one arriving after the deletion is never kept, and no quarantined file outlives
the quarantine's retention.
"""

from __future__ import annotations

import io
import json
import random
import struct
import subprocess
import time
import zlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from dropvault.flows.deletion import deletion_sweep
from dropvault.flows.ingest import ingest_drops
from dropvault.flows.settings import Settings
from dropvault.storage.home import Home
from dropvault.tasks import ingest, samples
from dropvault.tasks.dicom import uids_named
from dropvault.tasks.dicom.elements import file_meta
from dropvault.tasks.drop_names import drops_list
from dropvault.tasks.quarantine import expire_quarantine, quarantine_export
from tests.conftest import make_home
from tests.helpers import EXE, cli_env

QUIET = Settings(quiet_seconds=0)
NOW = datetime.now(UTC).isoformat()
STUDY_UID_ELEMENT = b"\x20\x00\x0d\x00UI"


def _study_uid_at(data: bytes) -> int:
    at = data.find(STUDY_UID_ELEMENT)
    assert at > 0
    return at


def cut_before_study_uid(data: bytes) -> bytes:
    return data[: _study_uid_at(data)]


def malformed_study_uid(data: bytes) -> bytes:
    at = _study_uid_at(data)
    length = struct.unpack_from("<H", data, at + 6)[0]
    value = data[at + 8 : at + 8 + length]
    bad = b"0" + value[1:]  # a leading zero: not a valid UID, nor the study's
    return data[: at + 8] + bad + data[at + 8 + length :]


def study_uid_as_un(data: bytes) -> bytes:
    at = _study_uid_at(data)
    length = struct.unpack_from("<H", data, at + 6)[0]
    head = data[:at] + b"\x20\x00\x0d\x00UN\x00\x00" + struct.pack("<I", length)
    return samples.truncated(head + data[at + 8 :], 0.8)


def no_preamble(data: bytes) -> bytes:
    return samples.truncated(data[132:], 0.8)


def study_uid_past_first_mib(data: bytes) -> bytes:
    at = _study_uid_at(data)
    blob = bytes(random.Random(7).getrandbits(8) for _ in range(1 << 12)) * 384  # 1.5 MiB
    private = (
        b"\x19\x00\x10\x00LO\x04\x00ACME"
        + b"\x19\x00\x00\x10OB\x00\x00"
        + struct.pack("<I", len(blob))
        + blob
    )
    return data[:at] + private + data[at:-7]


def deflated(data: bytes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def deflated_and_cut(data: bytes) -> bytes:
    return samples.truncated(deflated(data), 0.7)


def deflated_implicit_meta_and_cut(data: bytes) -> bytes:
    """Deflated, with the file meta written in implicit VR (pydicom reads it as such) and
    without its Media Storage SOP Instance UID: only the inflated data set names it."""
    whole = deflated(data)
    meta, start = file_meta(whole)
    implicit = b"".join(
        struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value
        for tag, value in meta.items()
        if tag != 0x00020003
    )
    return samples.truncated(whole[:132] + implicit + whole[start:], 0.7)


DAMAGES: dict[str, Callable[[bytes], bytes]] = {
    "cut before the study UID": cut_before_study_uid,
    "malformed study UID": malformed_study_uid,
    "study UID as VR UN, cut": study_uid_as_un,
    "no preamble, cut": no_preamble,
    "study UID past the first MiB, cut": study_uid_past_first_mib,
    "deflated, cut": deflated_and_cut,
    "deflated with an implicit VR meta, cut": deflated_implicit_meta_and_cut,
}


def _readable(blob: bytes) -> bytes:
    """What an attacker reads from a file: its bytes, and a deflated data set inflated
    (from every offset after the file meta that inflates at all)."""
    if b"1.2.840.10008.1.2.1.99" not in blob:
        return blob
    found = [blob]
    for start in range(132, min(len(blob), 600)):
        try:
            found.append(zlib.decompressobj(-zlib.MAX_WBITS).decompress(blob[start:]))
        except zlib.error:
            continue
    return b"".join(found)


def _home_bytes(home: Home, tmp_path: Path) -> list[tuple[str, bytes]]:
    home.catalog.drop_reader()
    blobs = [(str(p), p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()]
    return blobs + list(home.catalog.stored_files())


def _study(tmp_path: Path) -> tuple[Home, samples.Patient, str, dict[str, bytes], bytes]:
    rng = random.Random(18)
    home = make_home("file", tmp_path)
    patient = samples.make_patient(rng, 3)
    uid, files = samples.make_study(rng, patient, 2, "MR_small.dcm")
    samples.write_drop(home.drops, "fac", "intact", files, owners={uid: "user:ann"})
    ingest_drops(home=home, settings=QUIET)
    return home, patient, uid, files, next(iter(files.values()))


def _delete(home: Home, uid: str) -> None:
    row = {
        "request_id": "del-1",
        "owner": "user:ann",
        "study_uid": uid,
        "requested_at": datetime.now(UTC).isoformat(),
    }
    home.manifests.put_bytes("deletions/d.jsonl", (json.dumps(row) + "\n").encode())
    summary = deletion_sweep(home=home, settings=QUIET).summary()
    assert summary["studies_deleted"] == 1 and summary["all_verified"]


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_copy_goes_with_its_study_and_a_late_one_is_never_kept(
    tmp_path: Path, damage: str
) -> None:
    home, patient, uid, files, first = _study(tmp_path)
    damaged = DAMAGES[damage](first)
    samples.write_drop(home.drops, "fac", "again", {"x.dcm": damaged}, manifest=False)
    ingest_drops(home=home, settings=QUIET)
    qid = home.catalog.query("SELECT quarantine_id FROM quarantine")["quarantine_id"][0]
    # The attack is real: the quarantined copy gives the patient's name back.
    out = tmp_path / "review.dcm"
    quarantine_export(home, str(qid), out)
    assert patient.patient_id.encode() in _readable(out.read_bytes())
    out.unlink()

    _delete(home, uid)
    left = home.catalog.query(
        "SELECT count(*) AS n FROM quarantine WHERE quarantine_id = ?", [str(qid)]
    )
    assert left["n"][0] == 0
    with pytest.raises(LookupError):
        quarantine_export(home, str(qid), out)

    # The same damaged copy, late, in a drop named after the patient: refused, not kept.
    folder = f"LATE_{patient.patient_id}"
    samples.write_drop(home.drops, "fac", folder, {"x.dcm": damaged}, manifest=False)
    stats = ingest_drops(home=home, settings=QUIET)
    assert dict(stats.quarantined) == {"deleted_by_owner": 1}
    named = drops_list(home, names=True)
    assert folder not in set(named["name"].dropna())
    deletion_sweep(home=home, settings=QUIET)  # compacts what the late rows left

    header = pydicom.dcmread(io.BytesIO(first), stop_before_pixels=True)
    needles = {
        "study UID": uid,
        "series UID": str(header.SeriesInstanceUID),
        **{f"SOP UID {i}": samples.sop_uid(d) for i, d in enumerate(files.values())},
        "patient name": str(patient.name),
        "patient ID": patient.patient_id,
        "drop name": folder,
    }
    leaks = [
        f"{what} in {where}"
        for where, data in _home_bytes(home, tmp_path)
        for what, needle in needles.items()
        if needle.encode() in _readable(data)
    ]
    assert leaks == []


def test_a_damaged_copy_of_a_live_study_stays_and_another_studys_deletion_leaves_it(
    tmp_path: Path,
) -> None:
    """The match is by the study's own UIDs: deleting another study takes nothing else."""
    home, patient, uid, _, first = _study(tmp_path)
    other_uid, other = samples.make_study(
        random.Random(2), samples.make_patient(random.Random(2), 4), 1, "MR_small.dcm"
    )
    samples.write_drop(home.drops, "fac", "other", other, owners={other_uid: "user:ann"})
    samples.write_drop(
        home.drops, "fac", "again", {"x.dcm": cut_before_study_uid(first)}, manifest=False
    )
    ingest_drops(home=home, settings=QUIET)
    _delete(home, other_uid)
    assert home.catalog.query("SELECT count(*) AS n FROM quarantine")["n"][0] == 1


def test_no_quarantined_file_outlives_the_retention(tmp_path: Path) -> None:
    home, patient, _, _, first = _study(tmp_path)
    # Bytes that name no study at all, yet carry the patient's ID.
    stray = b"not DICOM; patient " + patient.patient_id.encode() + b" " * 200
    samples.write_drop(home.drops, "fac", "stray", {"note.txt": stray}, manifest=False)
    ingest_drops(home=home, settings=QUIET)
    q = home.catalog.query(
        "SELECT q.quarantine_id, o.record_key_id FROM quarantine q JOIN objects o USING (object_id)"
    )
    assert len(q) == 1
    qid, key_id = str(q["quarantine_id"][0]), str(q["record_key_id"][0])
    now = datetime.now(UTC)
    assert expire_quarantine(home, now + timedelta(days=89), 90) == 0  # still within it
    home.catalog.write(
        lambda con: con.execute(
            "UPDATE quarantine SET quarantined_at = quarantined_at - INTERVAL 91 DAY"
        )
    )
    summary = deletion_sweep(home=home, settings=QUIET).summary()
    assert summary["quarantine_expired"] == 1
    row = home.catalog.query(
        "SELECT reason, object_id, source_name_enc, detail FROM quarantine WHERE quarantine_id = ?",
        [qid],
    ).iloc[0]
    assert (row["reason"], row["object_id"]) == ("not_dicom", "")
    assert pd.isna(row["source_name_enc"]) and "shredded" in row["detail"]
    assert not home.keystore.live([key_id])
    assert not [e for e in home.quarantine.list() if qid in e.name]
    with pytest.raises(LookupError):
        quarantine_export(home, qid, tmp_path / "q.bin")
    audit = home.catalog.query(
        "SELECT count(*) AS n FROM audit_log WHERE action = 'quarantine_expired'"
    )
    assert audit["n"][0] == 1
    # Kept for ever when the operator says so.
    assert expire_quarantine(home, now + timedelta(days=10_000), 0) == 0


@pytest.mark.integration
def test_a_deletion_between_an_ingests_check_and_its_commit_keeps_no_copy(
    tmp_path: Path,
) -> None:
    """The sweep runs (another process) after an ingest batch checked a damaged and a
    changed copy against the tombstones, before it commits them."""
    home, patient, uid, files, first = _study(tmp_path)
    ds = pydicom.dcmread(io.BytesIO(first))
    ds.PatientComments = "changed"
    changed = io.BytesIO()
    ds.save_as(changed, enforce_file_format=True)
    folder = f"LATE_{patient.patient_id}"
    copies = {"cut.dcm": cut_before_study_uid(first), "conflict.dcm": changed.getvalue()}
    samples.write_drop(home.drops, "fac", folder, copies, manifest=False)
    row = {"request_id": "d", "owner": "user:ann", "study_uid": uid, "requested_at": NOW}
    home.manifests.put_bytes("deletions/d.jsonl", (json.dumps(row) + "\n").encode())
    swept: list[subprocess.CompletedProcess[str]] = []

    def sweep_in_another_process() -> None:
        if not swept:
            swept.append(
                subprocess.run(
                    [EXE, "sweep"],
                    env=cli_env(tmp_path / "home"),
                    capture_output=True,
                    text=True,
                    timeout=300,
                    check=False,
                )
            )

    ingest.FAULTS["after_vault_write"] = sweep_in_another_process
    try:
        stats = ingest_drops(home=home, settings=QUIET)
    finally:
        ingest.FAULTS.pop("after_vault_write", None)
    assert swept and swept[0].returncode == 0, swept[0].stderr[-2000:]
    assert dict(stats.quarantined) == {"deleted_by_owner": 2}
    rows = home.catalog.query("SELECT reason, object_id FROM quarantine")
    assert rows.values.tolist() == [["deleted_by_owner", ""]] * 2
    assert home.quarantine.list() == []
    assert folder not in set(drops_list(home, names=True)["name"].dropna())


def test_a_uid_other_files_share_is_no_claim_on_them(tmp_path: Path) -> None:
    """A deleted study whose series UID is one every file of a writer carries (its
    implementation class UID) takes no other patient's quarantined file, and refuses
    none that arrives later."""
    rng = random.Random(9)
    home = make_home("file", tmp_path)
    shared = "1.3.6.1.4.1.5962.2"  # pydicom's ImplementationClassUID, in every sample
    a_patient, b_patient, c_patient = (samples.make_patient(rng, i) for i in range(3))
    a_uid = generate_uid()
    a_files = {
        f"{i}.dcm": samples.make_instance(a_patient, a_uid, shared, "MR_small.dcm")
        for i in range(2)
    }
    _, b_files = samples.make_study(rng, b_patient, 1, "MR_small.dcm")
    _, c_files = samples.make_study(rng, c_patient, 1, "MR_small.dcm")
    b_cut = cut_before_study_uid(next(iter(b_files.values())))
    assert shared.encode() in b_cut
    samples.write_drop(home.drops, "fac", "a", a_files, owners={a_uid: "user:ann"})
    samples.write_drop(home.drops, "fac", "b", {"x.dcm": b_cut}, manifest=False)
    ingest_drops(home=home, settings=QUIET)
    _delete(home, a_uid)
    assert home.catalog.query("SELECT reason FROM quarantine")["reason"].tolist() == ["truncated"]
    c_cut = cut_before_study_uid(next(iter(c_files.values())))
    samples.write_drop(home.drops, "fac", "c", {"x.dcm": c_cut}, manifest=False)
    assert dict(ingest_drops(home=home, settings=QUIET).quarantined) == {"truncated": 1}


def test_bytes_packed_with_identity_tags_are_scanned_in_bounded_time() -> None:
    """The UID scan of a rejected file looks at each identity tag's element header: 12 MiB
    packed with the SOP Instance UID's tag (either byte order, every 2 bytes) once cost
    ~10 s a file. It stops after MAX_CANDIDATES tags; a real file's UIDs come first."""
    uid = generate_uid()
    value = uid.encode() + b"\0" * (len(uid) % 2)
    named = b"\0" * 132 + struct.pack("<HH2sH", 0x0008, 0x0018, b"UI", len(value)) + value
    flood = b"\x00\x08\x00\x18" * (3 << 20)  # 12 MiB
    started = time.process_time()
    assert uids_named(io.BytesIO(named + flood)) == {uid}
    assert time.process_time() - started < 2.0
