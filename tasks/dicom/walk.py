"""The lean path: a plain walk over a file's bytes.

pydicom builds a Python object per element, which is most of the cost of an
ingest. For a file already in memory, a plain walk over the bytes checks the
same structure and picks out the few values the catalog needs. It only ever
*accepts*: anything unusual (another transfer syntax, a character set, a
multi-valued or non-ASCII field, an out-of-order tag, deep nesting, no pixel
data) returns None and the file takes the pydicom path (validation.py), which
gives the reason. tests/test_dicom.py checks the two paths agree on every
sample and cut.
"""

from __future__ import annotations

import io
import struct

from pydicom.uid import UID

from dropvault.tasks.dicom.budget import MAX_ELEMENTS, MAX_ITEMS
from dropvault.tasks.dicom.elements import (
    ITEM,
    LONG_VRS,
    PIXEL_TAGS,
    SEQ_DELIM,
    U16,
    U32,
    UNDEFINED,
    Decline,
    check_pixel_element,
    file_meta,
)
from dropvault.tasks.dicom.header import (
    EXPLICIT_BE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    DicomHeader,
    DicomRejected,
)

_LEAN_SYNTAXES = {
    IMPLICIT_LE: ("<", False),
    EXPLICIT_LE: ("<", True),
    EXPLICIT_BE: (">", True),
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
_TAG = {"<": struct.Struct("<HH"), ">": struct.Struct(">HH")}
_EXPLICIT = {"<": struct.Struct("<HH2sH"), ">": struct.Struct(">HH2sH")}
_IMPLICIT = {"<": struct.Struct("<HHI"), ">": struct.Struct(">HHI")}
_IMPLICIT_SQ = {0x00081115, 0x00081140, 0x00081199, 0x00082112, 0x00400275, 0x00081032}


_ENCODINGS = {"": "ascii", "ISO_IR 6": "ascii", "ISO_IR 100": "latin_1", "ISO_IR 192": "utf_8"}
_PHI_TEXT = {0x00100010, 0x00100020, 0x00100021}


def _is_encapsulated_syntax(tsyntax: str) -> bool:
    uid = UID(tsyntax)
    return (
        uid.is_transfer_syntax
        and uid.is_compressed
        and not uid.is_deflated
        and uid.is_little_endian
        and not uid.is_implicit_VR
    )


def _skip_items(data: bytes, pos: int, end: int, endian: str, explicit: bool, depth: int) -> int:
    """Walk a sequence's items from ``pos``; return the position after it."""
    if depth > _MAX_DEPTH:
        raise Decline
    undefined_seq = end < 0
    limit = len(data) if undefined_seq else end
    tag_s, u32 = _TAG[endian], U32[endian]
    budget = MAX_ITEMS  # a flood of items is refused by the pydicom path's bound
    while pos < limit:
        budget -= 1
        if pos + 8 > len(data) or budget < 0:
            raise Decline
        group, elem = tag_s.unpack_from(data, pos)
        tag = (group << 16) | elem
        length = u32.unpack_from(data, pos + 4)[0]
        pos += 8
        if tag == SEQ_DELIM:
            if not undefined_seq:
                raise Decline
            return pos
        if tag != ITEM:
            raise Decline
        if length == UNDEFINED:
            pos = _walk(data, pos, -1, endian, explicit, depth + 1, None)
        else:
            item_end = pos + length
            if item_end > limit:
                raise Decline
            _walk(data, pos, item_end, endian, explicit, depth + 1, None)
            pos = item_end
    if undefined_seq or pos != limit:
        raise Decline
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
    # Bound methods, looked up once: this loop runs for every element of every file.
    head, short, u32 = (
        _EXPLICIT[endian].unpack_from,
        _IMPLICIT[endian].unpack_from,
        U32[endian].unpack_from,
    )
    wanted = _WANTED if found is not None else ()
    last = -1
    budget = MAX_ELEMENTS  # a flood of elements is refused by the pydicom path's bound
    while pos < limit:
        budget -= 1
        if pos + 8 > size or budget < 0:
            raise Decline
        if explicit:
            group, elem, vr, length = head(data, pos)
            tag = (group << 16) | elem
            if group == 0xFFFE:
                length = u32(data, pos + 4)[0]
                value = pos + 8
            elif vr in LONG_VRS:
                if pos + 12 > size:
                    raise Decline
                length = u32(data, pos + 8)[0]
                value = pos + 12
            else:
                value = pos + 8
            is_seq = vr == b"SQ"
        else:
            group, elem, length = short(data, pos)
            tag = (group << 16) | elem
            value = pos + 8
            is_seq = length == UNDEFINED or tag in _IMPLICIT_SQ
        if tag == 0xFFFEE00D:  # item delimiter
            if end >= 0 or found is not None:
                raise Decline
            return value
        if tag <= last:
            raise Decline
        last = tag
        if found is not None and tag >= 0x7FE00008 and tag in PIXEL_TAGS:
            return pos
        if length == UNDEFINED:
            if not is_seq:
                raise Decline
            pos = _skip_items(data, value, -1, endian, explicit, depth + 1)
            continue
        pos = value + length
        if pos > limit:
            raise Decline
        if is_seq and length:
            _skip_items(data, value, pos, endian, explicit, depth + 1)
        elif tag in wanted:
            found[tag] = data[value:pos]  # type: ignore[index]
    if end < 0 and found is None:
        raise Decline  # an undefined-length item must end with its delimiter
    return pos


def _lean_text(raw: bytes, encoding: str = "ascii") -> str:
    if b"\\" in raw or b"\x1b" in raw:
        raise Decline  # multi-valued or code extensions: leave these to pydicom
    try:
        return raw.rstrip(b" \x00").decode(encoding)
    except UnicodeDecodeError:
        raise Decline from None


def lean_header(data: bytes) -> DicomHeader | None:
    """The header of a well-formed file in memory, or None to take the pydicom path."""
    try:
        return _lean_header(data)
    except Exception:  # noqa: BLE001 - it only vouches; anything odd goes to pydicom
        return None


def _lean_header(data: bytes) -> DicomHeader | None:
    size = len(data)
    if size < 144 or data[128:132] != b"DICM":
        return None
    meta, pos = file_meta(data)
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
        numbers[keyword] = U16[endian].unpack(raw)[0] if len(raw) == 2 else None
        if raw and len(raw) != 2:
            return None
    frames_text = text.get("frames", "").strip()
    numbers["NumberOfFrames"] = int(frames_text) if frames_text.isdigit() else None
    if frames_text and numbers["NumberOfFrames"] is None:
        return None
    try:
        check_pixel_element(io.BytesIO(data), pixel_start, size, numbers, tsyntax)
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
