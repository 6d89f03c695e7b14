"""Synthetic DICOM built from the samples pydicom ships, for the demo, tests and benchmarks.

Patient identity and UIDs are rewritten, so every file is a new instance of a
made-up patient. Also here: the bad files a demo drop carries.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import struct
import tarfile
import zipfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import IO

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from dropvault.storage.locations import Location

# Uncompressed, single-frame samples that carry pixel data (all in pydicom's wheel).
IMAGE_SAMPLES = ("CT_small.dcm", "MR_small.dcm", "SC_rgb_small_odd.dcm", "rtdose_1frame.dcm")
FIRST = ("ADA", "BEN", "CLEO", "DAN", "EVA", "FINN", "GIA", "HUGO", "IRIS", "JON", "KAI", "LEA")
LAST = ("SMITH", "NGUYEN", "GARCIA", "MÜLLER", "ROSSI", "KOWALSKI", "TANAKA", "OKAFOR")


@cache
def _sample_bytes(name: str) -> bytes:
    path = get_testdata_file(name)
    if path is None:
        raise FileNotFoundError(f"pydicom sample {name} is not bundled")
    with open(path, "rb") as fh:  # noqa: PTH123 - path is a str from pydicom
        return fh.read()


def sample_dataset(name: str) -> Dataset:
    return pydicom.dcmread(io.BytesIO(_sample_bytes(name)))


@dataclass(frozen=True)
class Patient:
    patient_id: str
    name: str
    birth_date: str


def make_patient(rng: random.Random, index: int) -> Patient:
    return Patient(
        patient_id=f"MRN{rng.randrange(10**7, 10**8)}",
        name=f"{rng.choice(LAST)}^{rng.choice(FIRST)}^{index}",
        birth_date=f"{rng.randrange(1930, 2020)}{rng.randrange(1, 13):02d}"
        f"{rng.randrange(1, 29):02d}",
    )


def make_instance(
    patient: Patient,
    study_uid: str,
    series_uid: str,
    sample: str = "CT_small.dcm",
    sop_uid: str | None = None,
) -> bytes:
    """One DICOM file: ``sample`` with the patient and UIDs replaced."""
    ds = sample_dataset(sample)
    ds.PatientID = patient.patient_id
    ds.PatientName = patient.name
    ds.PatientBirthDate = patient.birth_date
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = UID(sop_uid) if sop_uid else generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8, for the names with umlauts
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def make_study(
    rng: random.Random, patient: Patient, instances: int, sample: str | None = None
) -> tuple[str, dict[str, bytes]]:
    """A study of ``instances`` files in one series: ``(study_uid, {name: bytes})``."""
    study_uid, series_uid = generate_uid(), generate_uid()
    sample = sample or rng.choice(IMAGE_SAMPLES)
    files = {
        f"{series_uid[-8:]}/{i:04d}.dcm": make_instance(patient, study_uid, series_uid, sample)
        for i in range(instances)
    }
    return study_uid, files


def write_multiframe(
    dst: IO[bytes],
    patient: Patient,
    study_uid: str,
    series_uid: str,
    frames: int,
    rows: int = 512,
    columns: int = 512,
    seed: int = 0,
) -> str:
    """Stream a large multi-frame 16-bit MR image to ``dst`` without holding its pixels in
    memory; returns its SOP Instance UID. ``frames`` of 512 x 512 are 512 KiB each."""
    ds = sample_dataset("MR_small.dcm")
    ds.PatientID = patient.patient_id
    ds.PatientName = patient.name
    ds.PatientBirthDate = patient.birth_date
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.SamplesPerPixel = 16, 16, 15, 1
    del ds.PixelData
    head = io.BytesIO()
    ds.save_as(head, enforce_file_format=True)
    dst.write(head.getvalue())
    frame_bytes = rows * columns * 2
    dst.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, frame_bytes * frames))
    pattern = random.Random(seed).randbytes(frame_bytes + frames)  # noqa: S311 - test pixels
    for i in range(frames):
        dst.write(pattern[i : i + frame_bytes])  # every frame differs; none held twice
    return str(ds.SOPInstanceUID)


# -- bad files --------------------------------------------------------------


def not_dicom() -> bytes:
    return b"Patient report\nthis is a text file, not DICOM\n"


def truncated(data: bytes, keep: float = 0.6) -> bytes:
    """Cut a file inside its pixel data."""
    return data[: int(len(data) * keep)]


def without(data: bytes, keyword: str) -> bytes:
    """The same file with one element (e.g. ``SOPInstanceUID``) removed."""
    ds = pydicom.dcmread(io.BytesIO(data))
    delattr(ds, keyword)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=False)
    return out.getvalue()


def sop_uid(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


def with_uid(data: bytes, sop_uid: str, tweak: bytes = b"") -> bytes:
    """The same file under another SOP Instance UID, optionally with other content."""
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.SOPInstanceUID = UID(sop_uid)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    if tweak:
        ds.ImageComments = tweak.decode()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


# -- drops ------------------------------------------------------------------


def write_drop(
    drops: Location,
    facility_id: str,
    folder: str,
    files: dict[str, bytes],
    *,
    manifest: bool = True,
    owners: dict[str, str] | None = None,
    listed: dict[str, bytes] | None = None,
) -> None:
    """Write a drop the way a facility would: files first, then ``manifest.json``.

    ``listed`` overrides what the manifest says about the files (for bad-manifest tests).
    """
    for name, data in files.items():
        drops.put_bytes(f"{facility_id}/{folder}/{name}", data)
    if not manifest:
        return
    described = listed if listed is not None else files
    doc = {
        "files": [
            {"path": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in described.items()
        ],
        "owners": owners or {},
    }
    drops.put_bytes(f"{facility_id}/{folder}/manifest.json", json.dumps(doc).encode())


# -- beacon hits ------------------------------------------------------------


PAGES = ("/", "/studies", "/share", "/help", "/pricing", "/about")
CAMPAIGNS = ("nl-2026-11", "nl-2026-12", "promo-winter")
PARTNERS = ("", "acme-imaging", "north-labs")
AGENTS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Firefox/133.0",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) Safari/605.1.15",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0) Mobile/15E148",
)


def make_hit(rng: random.Random, day: str, visitors: int = 500) -> dict[str, object]:
    """One realistic hit; now and then with an identifier where none belongs."""
    kind = rng.choices(
        ("page_view", "email_open", "cobrand", "unsubscribe"), weights=(70, 20, 8, 2)
    )[0]
    target = rng.choice(PAGES) if kind in ("page_view", "cobrand") else rng.choice(CAMPAIGNS)
    roll = rng.random()
    if roll < 0.01:
        target = f"/studies/1.2.840.113619.2.55.{rng.randrange(10**6)}"
    elif roll < 0.02:
        target = f"/patient/MRN{rng.randrange(10**7, 10**8)}"
    elif roll < 0.025:
        target = f"/share?to=someone{rng.randrange(99)}@example.org"
    agent = rng.choice(AGENTS)
    ip = f"{rng.randrange(1, 223)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}"
    if rng.random() < 0.03:
        agent = "Googlebot/2.1 (+http://www.google.com/bot.html)"
    if kind == "email_open" and rng.random() < 0.4:
        agent, ip = "Mozilla/5.0", f"17.{rng.randrange(256)}.{rng.randrange(256)}.1"
    return {
        "ts": f"{day}T{rng.randrange(24):02d}:{rng.randrange(60):02d}:00Z",
        "beacon": kind,
        "target": target,
        "partner": rng.choice(PARTNERS) if kind == "cobrand" else "",
        "visitor_id": f"v{rng.randrange(visitors)}",
        "ip": ip,
        "user_agent": agent,
        "url": f"https://share.example.org{target}?session={rng.randrange(10**9)}",
        "referrer": "https://www.example.org/?q=mri",
        "third_party": rng.random() < 0.05,
    }


def write_hits(
    beacons: Location, day: str, hits: list[dict[str, object]], name: str = "hits.jsonl"
) -> None:
    """Write hits as JSON Lines (``.jsonl``, optionally ``.gz``) or CSV (``.csv``)."""
    import csv
    import gzip

    if ".csv" in name:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(hits[0]))
        writer.writeheader()
        writer.writerows(hits)
        data = buffer.getvalue().encode()
    else:
        data = "".join(json.dumps(h) + "\n" for h in hits).encode()
    if name.endswith(".gz"):
        data = gzip.compress(data)
    beacons.put_bytes(f"{day}/{name}", data)


# -- archives and CDs ---------------------------------------------------------


def zip_bytes(files: dict[str, bytes], *, encrypted_flag: bool = False) -> bytes:
    """A ZIP of ``files`` (deflated). ``encrypted_flag`` sets the "encrypted" bit in every
    header, as a password-protected PACS export has (the bytes themselves stay plain)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    raw = out.getvalue()
    if not encrypted_flag:
        return raw
    buf = bytearray(raw)
    for sig, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = 0
        while (at := buf.find(sig, start)) >= 0:
            flags = struct.unpack_from("<H", buf, at + flag_at)[0]
            struct.pack_into("<H", buf, at + flag_at, flags | 0x1)
            start = at + 4
    return bytes(buf)


def tar_bytes(
    files: dict[str, bytes], *, gz: bool = True, links: dict[str, bytes] | None = None
) -> bytes:
    """A tar (gzipped by default) of ``files``. ``links`` adds members that are not regular
    files: ``{name: type}`` with a tarfile type (``tarfile.SYMTYPE``, ``CHRTYPE``, ...)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz" if gz else "w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, kind in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "/etc/passwd"
            tf.addfile(info)
    return out.getvalue()


def cd_files() -> dict[str, bytes]:
    """A patient image CD as copied from the disc: pydicom's ``dicomdirtests`` (a DICOMDIR
    naming 31 images in folders of files without extensions, and a README), plus the
    extras CDs carry (``autorun.inf``, a viewer program)."""
    found = get_testdata_file("DICOMDIR")
    if found is None:
        raise FileNotFoundError("pydicom's DICOMDIR samples are not bundled")
    root = Path(found).parent
    files = {
        p.relative_to(root).as_posix(): p.read_bytes()
        for folder in ("77654033", "98892001", "98892003")
        for p in sorted((root / folder).rglob("*"))
        if p.is_file()
    }
    files["DICOMDIR"] = (root / "DICOMDIR").read_bytes()
    files["README.txt"] = (root / "README.txt").read_bytes()
    files["autorun.inf"] = b"[autorun]\r\nopen=viewer\\viewer.exe\r\n"
    files["viewer/viewer.exe"] = b"MZ" + bytes(510)
    return files
