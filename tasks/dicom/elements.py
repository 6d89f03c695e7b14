"""The byte structure both parse paths check: element headers, the file meta group and
the pixel data element. Everything here seeks over values; nothing loads pixel data."""

from __future__ import annotations

import struct
from typing import IO, Any

from dropvault.tasks.dicom.header import EXPLICIT_BE, IMPLICIT_LE, NATIVE, DicomRejected
from dropvault.tasks.reasons import QuarantineReason

PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, Float, DoubleFloat
UNDEFINED = 0xFFFFFFFF
ITEM, SEQ_DELIM = 0xFFFEE000, 0xFFFEE0DD
U16 = {"<": struct.Struct("<H"), ">": struct.Struct(">H")}
U32 = {"<": struct.Struct("<I"), ">": struct.Struct(">I")}
# A frame is one fragment or a few; each is walked with a seek and a read (~1.5 us), so a
# file of empty 8-byte items would cost ~3 min a GiB without this bound.
MAX_FRAGMENTS = 1_000_000
MAX_TRAILING = 10_000  # elements after the pixel data (padding, a few private tags)


class Decline(Exception):
    """The lean walk does not vouch for this file; use the pydicom path."""


def int_value(ds: Any, keyword: str) -> int | None:
    """The element's value as an int, None when absent or not one. Any failure of pydicom's
    lazy conversion is the file's (a Rows of VR SQ raised a bare OSError, which read as
    the store's and failed every facility's batch)."""
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else int(value)
    except Exception:  # noqa: BLE001 - hostile bytes: a bad value is an absent one
        return None


def expected_native_length(ds: Any) -> int | None:
    rows, cols = int_value(ds, "Rows"), int_value(ds, "Columns")
    bits = int_value(ds, "BitsAllocated")
    if not rows or not cols or not bits:
        return None
    spp = int_value(ds, "SamplesPerPixel") or 1
    frames = int_value(ds, "NumberOfFrames") or 1
    total_bits = rows * cols * spp * frames * bits
    return (total_bits + 7) // 8


# A set, not a tuple: the walk tests every element's VR against it.
LONG_VRS = frozenset(
    {
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
    }
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
    """Elements after the pixel data (padding, private tags) must also end inside the file;
    more than :data:`MAX_TRAILING` of them is not an image (a seek and a read each: 64 MiB
    of empty ones took 13 s)."""
    for _ in range(MAX_TRAILING):
        if pos >= size:
            return
        _tag, length, value_start = _element_header(fp, pos, endian, explicit)
        if length == UNDEFINED:
            return  # a sequence after the pixels: accepted without a deeper walk
        pos = value_start + length
        if pos > size:
            raise DicomRejected(
                QuarantineReason.TRUNCATED, "an element after the pixel data is cut short"
            )
    if pos < size:
        raise DicomRejected(QuarantineReason.NOT_DICOM, "too many elements after the pixel data")


def check_pixel_element(fp: IO[bytes], start: int, size: int, ds: Any, tsyntax: str) -> None:
    """Check the pixel element at ``start`` lies whole inside the file; seeks, never loads."""
    little = tsyntax != EXPLICIT_BE
    explicit = tsyntax != IMPLICIT_LE
    endian = "<" if little else ">"
    _tag, length, value_start = _element_header(fp, start, endian, explicit)
    if length != UNDEFINED:
        if value_start + length > size:
            raise DicomRejected(
                QuarantineReason.TRUNCATED, "pixel data runs past the end of the file"
            )
        expected = expected_native_length(ds) if tsyntax in NATIVE else None
        if expected is not None and length < expected:
            raise DicomRejected(
                QuarantineReason.TRUNCATED, "pixel data shorter than rows x columns x frames"
            )
        _check_trailing(fp, value_start + length, size, endian, explicit)
        return
    # Encapsulated: walk the items (basic offset table, then fragments) to the delimiter.
    pos = value_start
    for _ in range(MAX_FRAGMENTS):
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
    raise DicomRejected(QuarantineReason.NOT_DICOM, "encapsulated pixel data has too many items")


def file_meta(data: bytes) -> tuple[dict[int, bytes], int]:
    """The group 0002 values (always explicit VR little endian) and where the dataset starts."""
    size = len(data)
    meta: dict[int, bytes] = {}
    pos = 132
    while pos + 8 <= size and data[pos : pos + 2] == b"\x02\x00":
        tag = (0x0002 << 16) | U16["<"].unpack_from(data, pos + 2)[0]
        if data[pos + 4 : pos + 6] in LONG_VRS:
            length, value = U32["<"].unpack_from(data, pos + 8)[0], pos + 12
        else:
            length, value = U16["<"].unpack_from(data, pos + 6)[0], pos + 8
        if length == UNDEFINED or value + length > size:
            raise Decline
        meta[tag] = data[value : value + length]
        pos = value + length
    return meta, pos
