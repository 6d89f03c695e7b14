"""Header-only DICOM parsing and validation.

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

import struct
import warnings
from dataclasses import dataclass, field
from typing import IO, Any

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

REQUIRED_UIDS = {
    "SOPInstanceUID": 0x00080018,
    "StudyInstanceUID": 0x0020000D,
    "SeriesInstanceUID": 0x0020000E,
}
PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, Float, DoubleFloat
UNDEFINED = 0xFFFFFFFF
DEFLATED = "1.2.840.10008.1.2.1.99"
NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", DEFLATED}
ITEM, SEQ_DELIM = 0xFFFEE000, 0xFFFEE0DD


class DicomRejected(Exception):
    """A file that must go to quarantine. ``reason`` is a code, ``detail`` is PHI-free."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DicomHeader:
    """What the catalog needs from a header. PHI fields are excluded from ``repr``."""

    sop_instance_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str | None
    modality: str | None
    transfer_syntax: str | None
    rows: int | None
    columns: int | None
    frames: int | None
    patient_id: str = field(default="", repr=False)
    issuer: str = field(default="", repr=False)
    patient_name: str = field(default="", repr=False)
    birth_date: str = field(default="", repr=False)

    def phi(self) -> dict[str, str]:
        """The identifying fields, to be stored only encrypted."""
        return {
            "patient_id": self.patient_id,
            "issuer": self.issuer,
            "patient_name": self.patient_name,
            "birth_date": self.birth_date,
        }


def _int(ds: Any, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _text(ds: Any, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - a bad value is treated as absent
        return ""
    return "" if value is None else str(value)


def _expected_native_length(ds: Any) -> int | None:
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    bits = _int(ds, "BitsAllocated")
    if not rows or not cols or not bits:
        return None
    spp = _int(ds, "SamplesPerPixel") or 1
    frames = _int(ds, "NumberOfFrames") or 1
    total_bits = rows * cols * spp * frames * bits
    return (total_bits + 7) // 8


LONG_VRS = (
    b"OB",
    b"OW",
    b"OF",
    b"OD",
    b"OL",
    b"UN",
    b"SQ",
    b"UT",
    b"OV",
    b"UC",
    b"UR",
    b"SV",
    b"UV",
)


def _element_header(fp: IO[bytes], start: int, endian: str, explicit: bool) -> tuple[int, int, int]:
    """``(tag, value length, value start)`` of the element at ``start``."""
    fp.seek(start)
    head = fp.read(12)
    if len(head) < 8:
        raise DicomRejected("truncated", "element header cut short")
    group, elem = struct.unpack(endian + "HH", head[:4])
    tag = (group << 16) | elem
    if explicit and group != 0xFFFE:
        if head[4:6] in LONG_VRS:
            if len(head) < 12:
                raise DicomRejected("truncated", "element header cut short")
            return tag, struct.unpack(endian + "I", head[8:12])[0], start + 12
        return tag, struct.unpack(endian + "H", head[6:8])[0], start + 8
    return tag, struct.unpack(endian + "I", head[4:8])[0], start + 8


def _check_trailing(fp: IO[bytes], pos: int, size: int, endian: str, explicit: bool) -> None:
    """Elements after the pixel data (padding, private tags) must also end inside the file."""
    while pos < size:
        _tag, length, value_start = _element_header(fp, pos, endian, explicit)
        if length == UNDEFINED:
            return  # a sequence after the pixels: accepted without a deeper walk
        pos = value_start + length
        if pos > size:
            raise DicomRejected("truncated", "an element after the pixel data is cut short")


def _check_pixel_element(fp: IO[bytes], start: int, size: int, ds: Any, tsyntax: str) -> None:
    """Check the pixel element at ``start`` lies whole inside the file; seeks, never loads."""
    little = tsyntax != "1.2.840.10008.1.2.2"
    explicit = tsyntax != "1.2.840.10008.1.2"
    endian = "<" if little else ">"
    _tag, length, value_start = _element_header(fp, start, endian, explicit)
    if length != UNDEFINED:
        if value_start + length > size:
            raise DicomRejected("truncated", "pixel data runs past the end of the file")
        expected = _expected_native_length(ds) if tsyntax in NATIVE else None
        if expected is not None and length < expected:
            raise DicomRejected("truncated", "pixel data shorter than rows x columns x frames")
        _check_trailing(fp, value_start + length, size, endian, explicit)
        return
    # Encapsulated: walk the items (basic offset table, then fragments) to the delimiter.
    pos = value_start
    while True:
        fp.seek(pos)
        item = fp.read(8)
        if len(item) < 8:
            raise DicomRejected("truncated", "encapsulated pixel data has no closing delimiter")
        group, elem, item_len = struct.unpack(endian + "HHI", item)
        tag = (group << 16) | elem
        if tag == SEQ_DELIM:
            _check_trailing(fp, pos + 8, size, endian, explicit)
            return
        if tag != ITEM or item_len == UNDEFINED:
            raise DicomRejected("not_dicom", "encapsulated pixel data has a bad item")
        pos += 8 + item_len
        if pos > size:
            raise DicomRejected("truncated", "pixel data fragment runs past the end of the file")


def _is_image_class(ds: Any) -> bool:
    """Image storage SOP classes must carry pixel data; a clean cut before it is truncation."""
    sop_class = _text(ds, "SOPClassUID")
    return bool(sop_class) and "Image Storage" in UID(sop_class).name


def read_header(fp: IO[bytes], size: int) -> DicomHeader:
    """Parse and validate one file's header from a seekable stream of ``size`` bytes."""
    if size == 0:
        raise DicomRejected("not_dicom", "empty file")
    head = fp.read(132)
    fp.seek(0)
    # A DICM preamble with nothing usable after it is a cut file, not a foreign one.
    cut_reason = "truncated" if head[128:132] == b"DICM" else "not_dicom"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(fp, stop_before_pixels=True)
    except InvalidDicomError as exc:
        raise DicomRejected(cut_reason, "no DICM prefix or file meta") from exc
    except (EOFError, struct.error) as exc:
        raise DicomRejected("truncated", "header ends inside an element") from exc
    except Exception as exc:  # noqa: BLE001 - any other parser failure is malformed input
        raise DicomRejected("not_dicom", f"header does not parse ({type(exc).__name__})") from exc
    pixel_start = fp.tell()
    meta = getattr(ds, "file_meta", None)
    tsyntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if not tsyntax:
        reason = cut_reason if fp.tell() >= size else "not_dicom"
        raise DicomRejected(reason, "file meta has no transfer syntax")
    if tsyntax != DEFLATED:
        for tag in ds.keys():  # noqa: SIM118 - iterating a Dataset converts every element
            elem = ds.get_item(tag)
            if (
                isinstance(elem, RawDataElement)
                and elem.length != UNDEFINED
                and elem.value_tell + elem.length > size
            ):
                raise DicomRejected("truncated", "a header element runs past the end of the file")
    ended_early = pixel_start >= size and (
        len(ds) == 0
        or _int(ds, "Rows") is not None
        or _is_image_class(ds)
        or not _text(ds, "SOPClassUID")
    )
    uids: dict[str, str] = {}
    for keyword, uid_tag in REQUIRED_UIDS.items():
        value = _text(ds, keyword) if ds.get_item(uid_tag) is not None else ""
        if not value:
            # A UID missing because the file stops before it is truncation, not a bad header.
            raise DicomRejected("truncated" if ended_early else "missing_uid", f"no {keyword}")
        if not UID(value).is_valid:
            raise DicomRejected("missing_uid", f"{keyword} is not a valid UID")
        uids[keyword] = value
    has_pixels = pixel_start < size and tsyntax != DEFLATED
    if has_pixels:
        _check_pixel_element(fp, pixel_start, size, ds, tsyntax)
    elif tsyntax != DEFLATED and (_int(ds, "Rows") or _is_image_class(ds)):
        raise DicomRejected("truncated", "image without pixel data")
    return DicomHeader(
        sop_instance_uid=uids["SOPInstanceUID"],
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        sop_class_uid=_text(ds, "SOPClassUID") or None,
        modality=_text(ds, "Modality") or None,
        transfer_syntax=tsyntax,
        rows=_int(ds, "Rows"),
        columns=_int(ds, "Columns"),
        frames=_int(ds, "NumberOfFrames") or (1 if _int(ds, "Rows") else None),
        patient_id=_text(ds, "PatientID"),
        issuer=_text(ds, "IssuerOfPatientID"),
        patient_name=_text(ds, "PatientName"),
        birth_date=_text(ds, "PatientBirthDate"),
    )
