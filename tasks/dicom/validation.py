"""Header parsing and validation through pydicom: the path that names every reason.

pydicom returns a partial dataset for a truncated file without raising
(TRAPS), so validation is ours: the file must have a ``DICM`` preamble and
file meta, the three UIDs, every header element must lie inside the file,
and the pixel data must be whole (native: the length Rows x Columns x
SamplesPerPixel x BitsAllocated/8 x NumberOfFrames; encapsulated: every
fragment inside the file and a closing delimiter). Pixel data is never read
into memory: the checks seek over it.

Messages raised from here carry a reason code and a fixed, PHI-free detail.
"""

from __future__ import annotations

import io
import logging
import re
import struct
import warnings
from typing import IO, Any

import pydicom
import pydicom.config
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.uid import UID

from dropvault.tasks.dicom.budget import (
    MalformedField,
    TooManyElements,
    read_bounded,
    read_inflated,
)
from dropvault.tasks.dicom.elements import UNDEFINED, check_pixel_element, int_value
from dropvault.tasks.dicom.filemeta import may_inflate
from dropvault.tasks.dicom.guards import check_meta_whole, check_preamble, inflated_data_set
from dropvault.tasks.dicom.header import DEFLATED, REQUIRED_UIDS, DicomHeader, DicomRejected
from dropvault.tasks.reasons import QuarantineReason

# pydicom's value checks warn and log with the value itself ("Invalid value for VR UI:
# '<value>'"), which can be PHI; this module validates what the catalog needs on its own.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
_pydicom_log = logging.getLogger("pydicom")
_pydicom_log.addHandler(logging.NullHandler())
_pydicom_log.propagate = False  # its messages quote element values


def _text(ds: Any, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - a bad value is treated as absent
        return ""
    return "" if value is None else str(value)


def _is_image_class(ds: Any) -> bool:
    """Image storage SOP classes must carry pixel data; a clean cut before it is truncation."""
    sop_class = _text(ds, "SOPClassUID")
    return bool(sop_class) and "Image Storage" in UID(sop_class).name


def read_header(fp: IO[bytes], size: int) -> DicomHeader:
    """Parse and validate one file's header from a seekable stream of ``size`` bytes.

    Raises only :class:`DicomRejected` for a bad file: pydicom converts values lazily and a
    hostile element can raise any exception from deep inside it (an unknown VR is one the
    fuzzer found), which is the file's fault, not the batch's. An OSError (the source
    could not be read) passes through: that is not the content's fault."""
    try:
        return _read_header(fp, size)
    except (DicomRejected, OSError):
        raise
    except Exception as exc:  # noqa: BLE001 - one file's boundary; the type says enough
        raise DicomRejected(
            QuarantineReason.NOT_DICOM, f"header does not parse ({type(exc).__name__})"
        ) from exc


def _read_header(fp: IO[bytes], size: int) -> DicomHeader:
    if size == 0:
        raise DicomRejected(QuarantineReason.NOT_DICOM, "empty file")
    head = fp.read(136)
    fp.seek(0)
    # A DICM preamble with nothing usable after it is a cut file, not a foreign one.
    cut_reason = (
        QuarantineReason.TRUNCATED if head[128:132] == b"DICM" else QuarantineReason.NOT_DICOM
    )
    check_preamble(head)
    if size > 133 and head[128:132] == b"DICM" and head[132:134] != b"\x02\x00":
        raise DicomRejected(QuarantineReason.NOT_DICOM, "no file meta after the DICM prefix")
    check_meta_whole(fp, size)
    inflated = inflated_data_set(fp, size)
    ds = _parse(fp, cut_reason, inflated)
    pixel_start = fp.tell() if inflated is None else size
    tsyntax = _transfer_syntax(ds, pixel_start, size, cut_reason)
    if tsyntax != DEFLATED:
        _check_elements_inside(ds, size)
    ended_early = pixel_start >= size and (
        len(ds) == 0
        or int_value(ds, "Rows") is not None
        or _is_image_class(ds)
        or not _text(ds, "SOPClassUID")
    )
    uids = _required_uids(ds, ended_early)
    has_pixels = pixel_start < size and tsyntax != DEFLATED
    if has_pixels:
        check_pixel_element(fp, pixel_start, size, ds, tsyntax)
    elif tsyntax != DEFLATED and (int_value(ds, "Rows") or _is_image_class(ds)):
        raise DicomRejected(QuarantineReason.TRUNCATED, "image without pixel data")
    return DicomHeader(
        sop_instance_uid=uids["SOPInstanceUID"],
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        sop_class_uid=_text(ds, "SOPClassUID") or None,
        modality=_text(ds, "Modality") or None,
        transfer_syntax=tsyntax,
        rows=int_value(ds, "Rows"),
        columns=int_value(ds, "Columns"),
        frames=int_value(ds, "NumberOfFrames") or (1 if int_value(ds, "Rows") else None),
        patient_id=_text(ds, "PatientID"),
        issuer=_text(ds, "IssuerOfPatientID"),
        patient_name=_text(ds, "PatientName"),
        birth_date=_text(ds, "PatientBirthDate"),
    )


def _parse(
    fp: IO[bytes], cut_reason: QuarantineReason, inflated: tuple[FileMetaDataset, bytes] | None
) -> Dataset:
    """pydicom's header parse, bounded (:mod:`.budget`), its failures mapped to reasons
    (it does not raise on a cut file, but warns when one ends inside an undefined-length
    element). ``inflated``: a deflated file's meta and inflated data set."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if inflated is None:
                ds: Dataset = read_bounded(fp, stop_before_pixels=True)
            else:
                ds = read_inflated(*inflated)
    except TooManyElements as exc:
        raise DicomRejected(QuarantineReason.NOT_DICOM, "header has too many elements") from exc
    except MalformedField as exc:
        raise DicomRejected(
            QuarantineReason.NOT_DICOM, "a header field is too long or not a value"
        ) from exc
    except InvalidDicomError as exc:
        raise DicomRejected(cut_reason, "no DICM prefix or file meta") from exc
    except (EOFError, struct.error, OSError, BytesLengthException) as exc:
        raise DicomRejected(cut_reason, "header ends inside an element") from exc
    except Exception as exc:  # noqa: BLE001 - any other parser failure is malformed input
        raise DicomRejected(
            QuarantineReason.NOT_DICOM, f"header does not parse ({type(exc).__name__})"
        ) from exc
    if any("before delimiter" in str(w.message) for w in caught):
        raise DicomRejected(
            QuarantineReason.TRUNCATED, "the file ends inside an undefined-length element"
        )
    return ds


def _transfer_syntax(ds: Dataset, pixel_start: int, size: int, cut_reason: QuarantineReason) -> str:
    meta = getattr(ds, "file_meta", None)
    tsyntax = _text(meta, "TransferSyntaxUID") if meta is not None else ""
    if not tsyntax:
        reason = cut_reason if pixel_start >= size else QuarantineReason.NOT_DICOM
        raise DicomRejected(reason, "file meta has no transfer syntax")
    if not UID(tsyntax).is_transfer_syntax:
        raise DicomRejected(QuarantineReason.NOT_DICOM, "unknown transfer syntax")
    return tsyntax


def _check_elements_inside(ds: Dataset, size: int) -> None:
    """Every header element whose length pydicom read lies inside the file."""
    for tag in ds.keys():  # noqa: SIM118 - iterating a Dataset converts every element
        elem = ds.get_item(tag, keep_deferred=True)
        if (
            isinstance(elem, RawDataElement)
            and elem.length != UNDEFINED
            and elem.value_tell + elem.length > size
        ):
            raise DicomRejected(
                QuarantineReason.TRUNCATED, "a header element runs past the end of the file"
            )


def _required_uids(ds: Dataset, ended_early: bool) -> dict[str, str]:
    uids: dict[str, str] = {}
    for keyword, uid_tag in REQUIRED_UIDS.items():
        value = _text(ds, keyword) if ds.get_item(uid_tag, keep_deferred=True) is not None else ""
        if not value:
            # A UID missing because the file stops before it is truncation, not a bad header.
            raise DicomRejected(
                QuarantineReason.TRUNCATED if ended_early else QuarantineReason.MISSING_UID,
                f"no {keyword}",
            )
        if not UID(value).is_valid:
            raise DicomRejected(QuarantineReason.MISSING_UID, f"{keyword} is not a valid UID")
        uids[keyword] = value
    return uids


UID_TEXT = re.compile(r"[0-9]+(\.[0-9]+)*")
STUDY_UID_TAG = 0x0020000D


def study_uid_hint(head: bytes) -> str | None:
    """The StudyInstanceUID a rejected file's first bytes name, if a parse can find one (a
    truncated copy of a study's image still names it), so its quarantined copy is deleted
    with the study. Best effort on hostile bytes: None on any failure or a value that is
    not a UID (free text there could be PHI).

    A deflated data set gives no hint: pydicom would inflate it whole, and a deflate bomb
    of 1 MB held an ingest for over a minute and 1 GiB of memory. Its UIDs are still
    found, inflated within a bound, by ``uid_scan.uids_named``."""
    if may_inflate(head, force=True):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_bounded(
                io.BytesIO(head), force=True, stop_before_pixels=True, specific_tags=[STUDY_UID_TAG]
            )
            value = str(ds.get("StudyInstanceUID") or "").strip("\0 ")
    except Exception:  # noqa: BLE001 - any failure on a bad file means "no hint"
        return None
    return value if len(value) <= 64 and UID_TEXT.fullmatch(value) else None
