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

import io
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from typing import IO, Any

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.uid import UID

from storage.errors import TerminalError
from tasks.reasons import QuarantineReason

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
# A deflated dataset may inflate to at most this much (pydicom inflates it whole in memory).
MAX_INFLATED = 64 * 1024 * 1024


class DicomRejected(TerminalError):
    """A file that must go to quarantine. ``reason`` is a code, ``detail`` is PHI-free."""

    def __init__(self, reason: QuarantineReason, detail: str) -> None:
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
        raise DicomRejected(QuarantineReason.TRUNCATED, "element header cut short")
    group, elem = struct.unpack(endian + "HH", head[:4])
    tag = (group << 16) | elem
    if explicit and group != 0xFFFE:
        if head[4:6] in LONG_VRS:
            if len(head) < 12:
                raise DicomRejected(QuarantineReason.TRUNCATED, "element header cut short")
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
            raise DicomRejected(
                QuarantineReason.TRUNCATED, "an element after the pixel data is cut short"
            )


def _check_pixel_element(fp: IO[bytes], start: int, size: int, ds: Any, tsyntax: str) -> None:
    """Check the pixel element at ``start`` lies whole inside the file; seeks, never loads."""
    little = tsyntax != "1.2.840.10008.1.2.2"
    explicit = tsyntax != "1.2.840.10008.1.2"
    endian = "<" if little else ">"
    _tag, length, value_start = _element_header(fp, start, endian, explicit)
    if length != UNDEFINED:
        if value_start + length > size:
            raise DicomRejected(
                QuarantineReason.TRUNCATED, "pixel data runs past the end of the file"
            )
        expected = _expected_native_length(ds) if tsyntax in NATIVE else None
        if expected is not None and length < expected:
            raise DicomRejected(
                QuarantineReason.TRUNCATED, "pixel data shorter than rows x columns x frames"
            )
        _check_trailing(fp, value_start + length, size, endian, explicit)
        return
    # Encapsulated: walk the items (basic offset table, then fragments) to the delimiter.
    pos = value_start
    while True:
        fp.seek(pos)
        item = fp.read(8)
        if len(item) < 8:
            raise DicomRejected(
                QuarantineReason.TRUNCATED, "encapsulated pixel data has no closing delimiter"
            )
        group, elem, item_len = struct.unpack(endian + "HHI", item)
        tag = (group << 16) | elem
        if tag == SEQ_DELIM:
            _check_trailing(fp, pos + 8, size, endian, explicit)
            return
        if tag != ITEM or item_len == UNDEFINED:
            raise DicomRejected(
                QuarantineReason.NOT_DICOM, "encapsulated pixel data has a bad item"
            )
        pos += 8 + item_len
        if pos > size:
            raise DicomRejected(
                QuarantineReason.TRUNCATED, "pixel data fragment runs past the end of the file"
            )


def _is_image_class(ds: Any) -> bool:
    """Image storage SOP classes must carry pixel data; a clean cut before it is truncation."""
    sop_class = _text(ds, "SOPClassUID")
    return bool(sop_class) and "Image Storage" in UID(sop_class).name


def read_header(fp: IO[bytes], size: int) -> DicomHeader:
    """Parse and validate one file's header from a seekable stream of ``size`` bytes."""
    if size == 0:
        raise DicomRejected(QuarantineReason.NOT_DICOM, "empty file")
    head = fp.read(136)
    fp.seek(0)
    # A DICM preamble with nothing usable after it is a cut file, not a foreign one.
    cut_reason = (
        QuarantineReason.TRUNCATED if head[128:132] == b"DICM" else QuarantineReason.NOT_DICOM
    )
    _check_preamble(head)
    if size > 133 and head[128:132] == b"DICM" and head[132:134] != b"\x02\x00":
        raise DicomRejected(QuarantineReason.NOT_DICOM, "no file meta after the DICM prefix")
    _check_meta_whole(fp, size)
    _check_inflated_size(fp, size)
    ds = _parse(fp, cut_reason)
    pixel_start = fp.tell()
    tsyntax = _transfer_syntax(ds, pixel_start, size, cut_reason)
    if tsyntax != DEFLATED:
        _check_elements_inside(ds, size)
    ended_early = pixel_start >= size and (
        len(ds) == 0
        or _int(ds, "Rows") is not None
        or _is_image_class(ds)
        or not _text(ds, "SOPClassUID")
    )
    uids = _required_uids(ds, ended_early)
    has_pixels = pixel_start < size and tsyntax != DEFLATED
    if has_pixels:
        _check_pixel_element(fp, pixel_start, size, ds, tsyntax)
    elif tsyntax != DEFLATED and (_int(ds, "Rows") or _is_image_class(ds)):
        raise DicomRejected(QuarantineReason.TRUNCATED, "image without pixel data")
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


# -- the lean path ----------------------------------------------------------
# pydicom builds a Python object per element, which is most of the cost of an
# ingest. For a file already in memory, a plain walk over the bytes checks the
# same structure and picks out the few values the catalog needs. It only ever
# *accepts*: anything unusual (another transfer syntax, a character set, a
# multi-valued or non-ASCII field, an out-of-order tag, deep nesting, no pixel
# data) returns None and the file takes the pydicom path above, which gives the
# reason. tests/test_dicom.py checks the two paths agree on every sample and cut.

_LEAN_SYNTAXES = {
    "1.2.840.10008.1.2": ("<", False),
    "1.2.840.10008.1.2.1": ("<", True),
    "1.2.840.10008.1.2.2": (">", True),
}
_LEAN_TEXT = {
    0x00080016: "sop_class_uid",
    0x00080018: "sop_instance_uid",
    0x00080060: "modality",
    0x00100010: "patient_name",
    0x00100020: "patient_id",
    0x00100021: "issuer",
    0x00100030: "birth_date",
    0x0020000D: "study_uid",
    0x0020000E: "series_uid",
    0x00280008: "frames",
}
_LEAN_US = {0x00280002: "SamplesPerPixel", 0x00280010: "Rows", 0x00280011: "Columns"}
_LEAN_US_BITS = 0x00280100
_CHARSET = 0x00080005
_WANTED = frozenset({*_LEAN_TEXT, *_LEAN_US, _LEAN_US_BITS, _CHARSET})
_MAX_DEPTH = 8
_U16 = {"<": struct.Struct("<H"), ">": struct.Struct(">H")}
_U32 = {"<": struct.Struct("<I"), ">": struct.Struct(">I")}
_TAG = {"<": struct.Struct("<HH"), ">": struct.Struct(">HH")}
_EXPLICIT = {"<": struct.Struct("<HH2sH"), ">": struct.Struct(">HH2sH")}
_IMPLICIT = {"<": struct.Struct("<HHI"), ">": struct.Struct(">HHI")}
_IMPLICIT_SQ = {0x00081115, 0x00081140, 0x00081199, 0x00082112, 0x00400275, 0x00081032}


_ENCODINGS = {"": "ascii", "ISO_IR 6": "ascii", "ISO_IR 100": "latin_1", "ISO_IR 192": "utf_8"}
_PHI_TEXT = {0x00100010, 0x00100020, 0x00100021}


def _parse(fp: IO[bytes], cut_reason: QuarantineReason) -> Dataset:
    """pydicom's header parse, its failures mapped to reasons (it does not raise on a cut
    file, but warns when one ends inside an undefined-length element)."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(fp, stop_before_pixels=True)
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
    tsyntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if not tsyntax:
        reason = cut_reason if pixel_start >= size else QuarantineReason.NOT_DICOM
        raise DicomRejected(reason, "file meta has no transfer syntax")
    if not UID(tsyntax).is_transfer_syntax:
        raise DicomRejected(QuarantineReason.NOT_DICOM, "unknown transfer syntax")
    return tsyntax


def _check_elements_inside(ds: Dataset, size: int) -> None:
    """Every header element whose length pydicom read lies inside the file."""
    for tag in ds.keys():  # noqa: SIM118 - iterating a Dataset converts every element
        elem = ds.get_item(tag)
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
        value = _text(ds, keyword) if ds.get_item(uid_tag) is not None else ""
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


def _is_encapsulated_syntax(tsyntax: str) -> bool:
    uid = UID(tsyntax)
    return (
        uid.is_transfer_syntax
        and uid.is_compressed
        and not uid.is_deflated
        and uid.is_little_endian
        and not uid.is_implicit_VR
    )


class _Decline(Exception):
    """The lean walk does not vouch for this file; use the pydicom path."""


def _skip_items(data: bytes, pos: int, end: int, endian: str, explicit: bool, depth: int) -> int:
    """Walk a sequence's items from ``pos``; return the position after it."""
    if depth > _MAX_DEPTH:
        raise _Decline
    undefined_seq = end < 0
    limit = len(data) if undefined_seq else end
    tag_s, u32 = _TAG[endian], _U32[endian]
    while pos < limit:
        if pos + 8 > len(data):
            raise _Decline
        group, elem = tag_s.unpack_from(data, pos)
        tag = (group << 16) | elem
        length = u32.unpack_from(data, pos + 4)[0]
        pos += 8
        if tag == SEQ_DELIM:
            if not undefined_seq:
                raise _Decline
            return pos
        if tag != ITEM:
            raise _Decline
        if length == UNDEFINED:
            pos = _walk(data, pos, -1, endian, explicit, depth + 1, None)
        else:
            item_end = pos + length
            if item_end > limit:
                raise _Decline
            _walk(data, pos, item_end, endian, explicit, depth + 1, None)
            pos = item_end
    if undefined_seq or pos != limit:
        raise _Decline
    return pos


def _walk(  # noqa: C901 - the hot per-element loop: helpers would cost a call per element
    data: bytes,
    pos: int,
    end: int,
    endian: str,
    explicit: bool,
    depth: int,
    found: dict[int, bytes] | None,
) -> int:
    """Walk elements from ``pos`` to ``end`` (-1: to an item delimiter; at the top level,
    to the pixel data). Returns where it stopped. ``found`` collects the wanted values."""
    size = len(data)
    limit = size if end < 0 else end
    head_s, short_s, u32 = _EXPLICIT[endian], _IMPLICIT[endian], _U32[endian]
    wanted = _WANTED if found is not None else ()
    last = -1
    while pos < limit:
        if pos + 8 > size:
            raise _Decline
        if explicit:
            group, elem, vr, length = head_s.unpack_from(data, pos)
            tag = (group << 16) | elem
            if group == 0xFFFE:
                length = u32.unpack_from(data, pos + 4)[0]
                value = pos + 8
            elif vr in LONG_VRS:
                if pos + 12 > size:
                    raise _Decline
                length = u32.unpack_from(data, pos + 8)[0]
                value = pos + 12
            else:
                value = pos + 8
            is_seq = vr == b"SQ"
        else:
            group, elem, length = short_s.unpack_from(data, pos)
            tag = (group << 16) | elem
            value = pos + 8
            is_seq = length == UNDEFINED or tag in _IMPLICIT_SQ
        if tag == 0xFFFEE00D:  # item delimiter
            if end >= 0 or found is not None:
                raise _Decline
            return value
        if tag <= last:
            raise _Decline
        last = tag
        if found is not None and tag >= 0x7FE00008 and tag in PIXEL_TAGS:
            return pos
        if length == UNDEFINED:
            if not is_seq:
                raise _Decline
            pos = _skip_items(data, value, -1, endian, explicit, depth + 1)
            continue
        pos = value + length
        if pos > limit:
            raise _Decline
        if is_seq and length:
            _skip_items(data, value, pos, endian, explicit, depth + 1)
        elif tag in wanted:
            found[tag] = data[value:pos]  # type: ignore[index]
    if end < 0 and found is None:
        raise _Decline  # an undefined-length item must end with its delimiter
    return pos


def _lean_text(raw: bytes, encoding: str = "ascii") -> str:
    if b"\\" in raw or b"\x1b" in raw:
        raise _Decline  # multi-valued or code extensions: leave these to pydicom
    try:
        return raw.rstrip(b" \x00").decode(encoding)
    except UnicodeDecodeError:
        raise _Decline from None


def lean_header(data: bytes) -> DicomHeader | None:
    """The header of a well-formed file in memory, or None to take the pydicom path."""
    try:
        return _lean_header(data)
    except (_Decline, struct.error, IndexError):
        return None


def _file_meta(data: bytes) -> tuple[dict[int, bytes], int]:
    """The group 0002 values (always explicit VR little endian) and where the dataset starts."""
    size = len(data)
    meta: dict[int, bytes] = {}
    pos = 132
    while pos + 8 <= size and data[pos : pos + 2] == b"\x02\x00":
        tag = (0x0002 << 16) | _U16["<"].unpack_from(data, pos + 2)[0]
        if data[pos + 4 : pos + 6] in LONG_VRS:
            length, value = _U32["<"].unpack_from(data, pos + 8)[0], pos + 12
        else:
            length, value = _U16["<"].unpack_from(data, pos + 6)[0], pos + 8
        if length == UNDEFINED or value + length > size:
            raise _Decline
        meta[tag] = data[value : value + length]
        pos = value + length
    return meta, pos


EXECUTABLE_MAGIC = (b"MZ", b"\x7fELF", b"\xcf\xfa\xed\xfe", b"\xfe\xed\xfa\xcf", b"#!")


def _check_preamble(head: bytes) -> None:
    """A preamble that is an executable header makes a DICOM/PE or DICOM/ELF polyglot
    (CVE-2019-11687): such a file is refused even when the rest is a valid image."""
    if head.startswith(EXECUTABLE_MAGIC):
        raise DicomRejected(QuarantineReason.NOT_DICOM, "the preamble is an executable header")


def _check_meta_whole(fp: IO[bytes], size: int) -> None:
    """A file meta element that runs past the end of the file is a cut file (pydicom would
    read the cut transfer syntax as an unknown one)."""
    head = fp.read(min(size, 65536))
    fp.seek(0)
    if head[128:132] != b"DICM":
        return
    try:
        _file_meta(head)
    except _Decline:
        if len(head) == size:
            raise DicomRejected(QuarantineReason.TRUNCATED, "file meta is cut short") from None
    except struct.error:
        raise DicomRejected(QuarantineReason.TRUNCATED, "file meta is cut short") from None


def _check_inflated_size(fp: IO[bytes], size: int) -> None:
    """Refuse a deflated dataset that inflates past :data:`MAX_INFLATED` (a deflate bomb).

    pydicom inflates the whole dataset in memory, so this runs first, streaming and
    counting without keeping the output.
    """
    head = fp.read(min(size, 65536))
    fp.seek(0)
    if DEFLATED.encode() not in head:
        return
    try:
        meta, start = _file_meta(head)
    except (_Decline, struct.error):
        return  # pydicom reports the broken meta
    if meta.get(0x00020010, b"").rstrip(b" \x00") != DEFLATED.encode():
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    fp.seek(start)
    total = 0
    pending = b""
    while not inflater.eof:
        if not pending:
            pending = fp.read(1024 * 1024)
            if not pending:
                break
        # At most 1 MiB out per step: the memory stays bounded whatever the ratio.
        try:
            total += len(inflater.decompress(pending, 1024 * 1024))
        except zlib.error as exc:
            fp.seek(0)
            raise DicomRejected(
                QuarantineReason.NOT_DICOM, "deflated dataset does not inflate"
            ) from exc
        pending = inflater.unconsumed_tail
        if total > MAX_INFLATED:
            fp.seek(0)
            raise DicomRejected(
                QuarantineReason.NOT_DICOM, "deflated dataset inflates past the limit"
            )
    fp.seek(0)


def _lean_header(data: bytes) -> DicomHeader | None:
    size = len(data)
    if size < 144 or data[128:132] != b"DICM":
        return None
    meta, pos = _file_meta(data)
    tsyntax = _lean_text(meta.get(0x00020010, b""))
    if tsyntax in _LEAN_SYNTAXES:
        endian, explicit = _LEAN_SYNTAXES[tsyntax]
    elif _is_encapsulated_syntax(tsyntax):
        endian, explicit = "<", True
    else:
        return None
    found: dict[int, bytes] = {}
    pixel_start = _walk(data, pos, -1, endian, explicit, 0, found)
    if pixel_start >= size:
        return None  # no pixel data: the image-class rules live on the pydicom path
    encoding = _ENCODINGS.get(_lean_text(found.get(_CHARSET, b"")))
    if encoding is None:
        return None
    text = {
        name: _lean_text(found[tag], encoding if tag in _PHI_TEXT else "ascii")
        for tag, name in _LEAN_TEXT.items()
        if tag in found
    }
    for name in ("sop_instance_uid", "study_uid", "series_uid"):
        if not text.get(name) or not UID(text[name]).is_valid:
            return None
    numbers: dict[str, int | None] = {}
    for tag, keyword in (*_LEAN_US.items(), (_LEAN_US_BITS, "BitsAllocated")):
        raw = found.get(tag, b"")
        numbers[keyword] = _U16[endian].unpack(raw)[0] if len(raw) == 2 else None
        if raw and len(raw) != 2:
            return None
    frames_text = text.get("frames", "").strip()
    numbers["NumberOfFrames"] = int(frames_text) if frames_text.isdigit() else None
    if frames_text and numbers["NumberOfFrames"] is None:
        return None
    try:
        _check_pixel_element(io.BytesIO(data), pixel_start, size, numbers, tsyntax)
    except DicomRejected:
        return None
    rows = numbers["Rows"] or None
    return DicomHeader(
        sop_instance_uid=text["sop_instance_uid"],
        study_uid=text["study_uid"],
        series_uid=text["series_uid"],
        sop_class_uid=text.get("sop_class_uid") or None,
        modality=text.get("modality") or None,
        transfer_syntax=tsyntax,
        rows=numbers["Rows"],
        columns=numbers["Columns"],
        frames=numbers["NumberOfFrames"] or (1 if rows else None),
        patient_id=text.get("patient_id", ""),
        issuer=text.get("issuer", ""),
        patient_name=text.get("patient_name", ""),
        birth_date=text.get("birth_date", ""),
    )


def header_from_bytes(data: bytes) -> DicomHeader:
    """Parse and validate a file held in memory: the lean walk, else the pydicom path."""
    _check_preamble(data[:8])
    return lean_header(data) or read_header(io.BytesIO(data), len(data))
