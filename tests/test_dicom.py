"""Header validation: the samples pydicom ships pass; files broken in code fail with a reason."""

from __future__ import annotations

import io
import random

import pytest

from dropvault.tasks import samples
from dropvault.tasks.dicom import DicomRejected, header_from_bytes, lean_header, read_header

GOOD = [
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
    "SC_rgb_rle.dcm",
    "JPEG2000.dcm",
    "rtplan.dcm",
    "image_dfl.dcm",
    "examples_overlay.dcm",
]


def header_of(data: bytes):  # type: ignore[no-untyped-def]
    """The ingest path for a file in memory (lean walk, else pydicom)."""
    return header_from_bytes(data)


@pytest.mark.parametrize("name", GOOD)
def test_bundled_samples_validate(name: str) -> None:
    data = samples._sample_bytes(name)
    header = header_of(data)
    assert header.sop_instance_uid and header.study_uid and header.series_uid


def test_phi_is_not_in_repr() -> None:
    patient = samples.make_patient(random.Random(3), 1)
    data = samples.make_instance(patient, "1.2.3", "1.2.3.4")
    header = header_of(data)
    assert header.patient_id == patient.patient_id
    assert patient.patient_id not in repr(header) and patient.name not in repr(header)


@pytest.mark.parametrize(
    ("maker", "reason"),
    [
        (lambda d: b"", "not_dicom"),
        (lambda d: b"just some text\n" * 20, "not_dicom"),
        (lambda d: b"MZ" + b"\x00" * 200, "not_dicom"),
        (lambda d: d[:100], "not_dicom"),
        (lambda d: d[:132], "truncated"),
        (lambda d: d[: len(d) // 2], "truncated"),
        (lambda d: d[:-1], "truncated"),
        (lambda d: samples.without(d, "SOPInstanceUID"), "missing_uid"),
        (lambda d: samples.without(d, "SeriesInstanceUID"), "missing_uid"),
        (lambda d: samples.without(d, "StudyInstanceUID"), "missing_uid"),
    ],
)
def test_bad_files_are_rejected_with_reason(maker, reason: str) -> None:  # type: ignore[no-untyped-def]
    data = samples._sample_bytes("CT_small.dcm")
    with pytest.raises(DicomRejected) as info:
        header_of(maker(data))
    assert info.value.reason == reason


def test_every_cut_is_caught() -> None:
    """Truncation at any byte offset past the preamble is rejected, never accepted."""
    data = samples._sample_bytes("MR_small.dcm")
    for cut in range(0, len(data) - 1, 37):
        with pytest.raises(DicomRejected):
            header_of(data[:cut])


def test_bundled_truncated_samples() -> None:
    for name in ("MR_truncated.dcm", "rtplan_truncated.dcm"):
        data = samples._sample_bytes(name)
        with pytest.raises(DicomRejected) as info:
            header_of(data)
        assert info.value.reason == "truncated"


def test_encapsulated_fragment_cut() -> None:
    data = samples._sample_bytes("SC_rgb_rle.dcm")
    with pytest.raises(DicomRejected) as info:
        header_of(data[:-20])
    assert info.value.reason == "truncated"


def _local_samples() -> list[bytes]:
    """Every file pydicom ships under 5 MB (no downloads)."""
    from pathlib import Path

    import pydicom.data

    root = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent
    return [
        p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.stat().st_size < 5_000_000
    ]


def _slow(data: bytes):  # type: ignore[no-untyped-def]
    try:
        return read_header(io.BytesIO(data), len(data))
    except Exception as exc:  # noqa: BLE001 - compared, not hidden
        return exc


def test_lean_walk_agrees_with_pydicom_on_every_sample_and_cut() -> None:
    """The lean walk either declines a file or returns exactly what the pydicom path returns
    (PHI fields included); it never accepts a file the pydicom path rejects."""
    accepted = 0
    for data in _local_samples():
        step = max(1, len(data) // 200)
        for cut in [len(data), *range(0, len(data), step)]:
            piece = data[:cut]
            fast = lean_header(piece)
            if fast is None:
                continue
            accepted += 1
            slow = _slow(piece)
            assert fast == slow and fast.phi() == slow.phi()
    assert accepted >= 40  # the lean path is really taken


def test_lean_walk_takes_the_common_files() -> None:
    rng = random.Random(5)
    for name in ("CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm"):
        _, study = samples.make_study(rng, samples.make_patient(rng, 1), 3, name)
        for data in study.values():
            fast = lean_header(data)
            assert fast is not None and fast == _slow(data) and fast.phi() == _slow(data).phi()
