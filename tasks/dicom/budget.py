"""pydicom's parse of untrusted bytes, within bounds on what it walks, reads and converts.

pydicom builds a Python object per element and per sequence item and walks them eagerly;
it keeps a defined-length sequence or a multi-valued string raw and converts it when it is
first read. Outside reviews found headers that cost one file's ingest (or every scan of
the drops, for a DICOMDIR) seconds to minutes and hundreds of MB to GB: 16 MiB of 8-byte
private elements (12 s, 764 MB), 1 MiB of empty items (2.7 s, 140 MB), a 64 KB deflated
file inflating to 8 M elements (24 s), Rows as a sequence of 8 MiB of items (20 s, 760 MB
at the look-up), a 1 MiB Specific Character Set (19 s, 914 MB), a 512 MiB private value
(565 MB). The bounds:

- every ``read`` pydicom makes of the file (it reads each element and item header on its
  own, nested ones too), the item headers among them, the bytes they return, and every
  top-level element;
- a value over :data:`DEFER_BYTES` is not read at all (the catalog never reads one);
- the fields the catalog reads (:data:`FIELD_TAGS`) must be short values, not sequences,
  and a Specific Character Set anywhere must be short;
- a defined-length sequence read here (a DICOMDIR's records) is parsed under the same
  counters (:func:`read_sequence_bounded`).

A deflated data set is inflated within a bound (:mod:`.guards`) and walked as pydicom
would walk its own inflated buffer, under the same counters.

The bounds sit far above real headers: an enhanced multi-frame image of 3,000 frames has
~150,000 elements and items in all. At the bounds a file costs ~6 s and ~330 MB.
"""

from __future__ import annotations

import contextlib
import io
import struct
import warnings
from collections.abc import Callable, Iterator
from typing import IO, Any

from pydicom import filereader
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset

from dropvault.tasks.dicom.elements import PIXEL_TAGS

MAX_READS = 1_000_000  # reads of the file: ~400,000 elements, ~6 s and ~330 MB at most
MAX_ITEMS = 100_000  # sequence items (pydicom builds a data set of ~1 KB for each)
MAX_ELEMENTS = 100_000  # top-level elements (a real header has hundreds)
MAX_READ_BYTES = 64 << 20  # header values read into memory, in all
# A value longer than this is not read (pydicom skips it, and reads it only if asked, which
# nothing here does): a private blob, an overlay or an icon costs no memory, a defined-length
# sequence is never parsed outside these counters, and a charset inside an item stays small.
DEFER_BYTES = 4096
# The elements the catalog reads are short strings and numbers: one longer than this, of
# undefined length, or of VR SQ is malformed (pydicom would parse a sequence, or convert a
# million values, only when it is read: 8 MiB as Rows cost 20 s and 760 MB).
MAX_FIELD_BYTES = 1024
# A Specific Character Set names a few terms ("ISO 2022 IR 6\ISO 2022 IR 87"): pydicom looks
# each up, twice, for every data set that has one, sequence items included (2,020 items of
# 511 unknown terms cost 24 s). Its value and how many data sets carry one are bounded.
MAX_CHARSET_BYTES = 128
MAX_CHARSETS = 64
FIELD_TAGS = frozenset(
    {
        0x00080005,  # SpecificCharacterSet: its values are looked up one by one at the read
        0x00080016,
        0x00080018,
        0x00080060,
        0x00100010,
        0x00100020,
        0x00100021,
        0x00100030,
        0x0020000D,
        0x0020000E,
        0x00280002,
        0x00280008,
        0x00280010,
        0x00280011,
        0x00280100,
    }
)
_ITEM_TAGS = (b"\xfe\xff\x00\xe0", b"\xff\xfe\xe0\x00")  # (FFFE,E000), little and big endian
# (0008,0005) as an element header starts: pydicom never defers its value (it needs it to
# decode the rest), in a sequence's items too, where no stop_when sees it.
_CHARSET_TAGS = {b"\x08\x00\x05\x00": "<", b"\x00\x08\x00\x05": ">"}
UNDEFINED = 0xFFFFFFFF


class TooManyElements(Exception):
    """The header has more elements or items than this module's bounds allow."""


class MalformedField(Exception):
    """One of :data:`FIELD_TAGS` is too long, of undefined length or a sequence."""


class _CountedReads:
    """``fp``, failing once pydicom has made more than :data:`MAX_READS` reads of it, read
    more than :data:`MAX_ITEMS` item headers (8 bytes, tag (FFFE,E000)) or
    :data:`MAX_READ_BYTES` in all."""

    # pydicom quotes it in errors, and would reopen a file by this name to read a deferred
    # value: never, here (the name could lead through a symlink).
    name = "<no filename>"

    def __init__(self, fp: IO[bytes], items: int = MAX_ITEMS) -> None:
        self._fp = fp
        self._reads = MAX_READS
        self._items = items
        self._bytes = MAX_READ_BYTES
        self._charsets = MAX_CHARSETS
        self.exceeded = False
        self.malformed = False

    def read(self, size: int = -1) -> bytes:
        self._reads -= 1
        if self._reads < 0 or self._items < 0 or not 0 <= size <= self._bytes:
            self.exceeded = True  # checked before the read: one value cannot take it all
            raise TooManyElements
        data = self._fp.read(size)
        self._bytes -= len(data)
        if size == 8:
            if data[:4] in _ITEM_TAGS:
                self._items -= 1
            elif data[:4] in _CHARSET_TAGS:
                self._charsets -= 1
                if self._charsets < 0 or _charset_too_long(data):
                    self.malformed = True
                    raise MalformedField
        return data

    def close(self) -> None:
        """No more reads: pydicom would read a deferred value back on a look-up."""
        self._bytes = -1

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fp.seek(offset, whence)

    def tell(self) -> int:
        return self._fp.tell()


def _charset_too_long(header: bytes) -> bool:
    """Whether the element header of a Specific Character Set (explicit VR "CS", else
    implicit) states a value longer than :data:`MAX_CHARSET_BYTES` (another explicit VR
    read as an implicit length is always longer)."""
    endian = _CHARSET_TAGS[header[:4]]
    if header[4:6] == b"CS":
        return int(struct.unpack(endian + "H", header[6:8])[0]) > MAX_CHARSET_BYTES
    length = int(struct.unpack(endian + "I", header[4:8])[0])
    return length != UNDEFINED and length > MAX_CHARSET_BYTES


def _stop(before_pixels: bool, elements: int) -> Callable[[Any, Any, int], bool]:
    seen = 0

    def stop_when(tag: Any, vr: Any, length: int) -> bool:
        nonlocal seen
        if before_pixels and tag in PIXEL_TAGS:
            return True
        seen += 1
        if seen > elements:
            raise TooManyElements
        if tag in FIELD_TAGS and (vr == "SQ" or length == UNDEFINED or length > MAX_FIELD_BYTES):
            raise MalformedField
        return False

    return stop_when


@contextlib.contextmanager
def _quiet_charsets() -> Iterator[None]:
    """pydicom warns (and logs) for each unknown value of a Specific Character Set; kept in
    a caller's record or the warning registry, many cost seconds and hundreds of MB."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"pydicom\.charset")
        yield


def read_bounded(
    fp: IO[bytes],
    *,
    force: bool = False,
    stop_before_pixels: bool = False,
    specific_tags: list[int] | None = None,
    items: int = MAX_ITEMS,
    defer: bool = True,
) -> FileDataset:
    """``pydicom.dcmread`` of ``fp`` (left where pydicom stops), raising
    :class:`TooManyElements` past a bound (``items``: of sequence items). pydicom reads
    every value as it walks (none is deferred), so later look-ups never read ``fp``.

    A deflated file must not come here (pydicom would inflate and walk it unbounded):
    its callers refuse it or read it through :func:`read_inflated`."""
    reader = _CountedReads(fp, items)
    try:
        with _quiet_charsets():
            ds = filereader.read_partial(
                reader,  # type: ignore[arg-type]
                _stop(stop_before_pixels, MAX_ELEMENTS),
                defer_size=DEFER_BYTES if defer else None,
                force=force,
                specific_tags=specific_tags,
            )
    except Exception as exc:
        _reraise(reader, exc)
        raise
    reader.close()
    return ds


def _reraise(reader: _CountedReads, exc: Exception) -> None:
    """pydicom re-raises a failed item read as OSError: the bound is the reason."""
    if reader.malformed and not isinstance(exc, MalformedField):
        raise MalformedField from None
    if reader.exceeded and not isinstance(exc, TooManyElements):
        raise TooManyElements from None


def read_sequence_bounded(ds: Dataset, tag: int, items: int = MAX_ITEMS) -> list[Dataset]:
    """The items of the sequence at ``tag`` in ``ds``. pydicom keeps a sequence of defined
    length as raw bytes and parses it when it is first read, outside any counter (a 4 MiB
    DICOMDIR's records cost 13 s and 407 MB so): here that parse is counted too. An
    element that is not a sequence gives no items."""
    raw = ds.get_item(tag, keep_deferred=True)
    if raw is None:
        return []
    if not isinstance(raw, RawDataElement):
        return list(raw.value) if raw.VR == "SQ" else []
    if raw.VR not in ("SQ", None) or raw.length == UNDEFINED or not raw.value:
        return []
    implicit, little = ds.original_encoding
    reader = _CountedReads(io.BytesIO(raw.value), items)
    try:
        with _quiet_charsets():
            return list(
                filereader.read_sequence(
                    reader,
                    bool(implicit),
                    bool(little),
                    raw.length,
                    ds.original_character_set,
                    raw.value_tell,
                )
            )
    except Exception as exc:
        _reraise(reader, exc)
        raise


def read_inflated(meta: FileMetaDataset, inflated: bytes) -> Dataset:
    """The header of a deflated file whose data set was inflated within its bound
    (:func:`.guards.inflated_data_set`), read as pydicom reads the inflated buffer
    (explicit VR little endian, up to the pixel data) under the same bounds."""
    reader = _CountedReads(io.BytesIO(inflated))
    try:
        with _quiet_charsets():
            ds = filereader.read_dataset(
                reader,  # type: ignore[arg-type]
                is_implicit_VR=False,
                is_little_endian=True,
                stop_when=_stop(True, MAX_ELEMENTS),
                defer_size=DEFER_BYTES,
            )
    except Exception as exc:
        _reraise(reader, exc)
        raise
    reader.close()
    ds.file_meta = meta
    return ds
