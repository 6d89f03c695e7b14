"""pydicom's parse of untrusted bytes, within a bound on how many elements it walks.

pydicom builds a Python object per element and per sequence item, and walks them all
eagerly. An outside review found headers that cost a file's ingest (or every scan of the
drops, for a DICOMDIR) seconds and hundreds of MiB: 16 MiB of 8-byte private elements
(12 s, 764 MB), a sequence of 1 MiB of empty items (2.7 s, 140 MB), a 64 KB deflated
file inflating to 8 M elements (24 s). Counters bound that walk:

- every ``read`` pydicom makes of the file (it reads each element and item header on its
  own, nested ones too), and
- every sequence item header among those reads, and every top-level element.

A deflated data set is inflated here within a bound (:mod:`.guards`) and walked as
pydicom would walk its own inflated buffer, under the same counters.

The bounds sit far above real headers: an enhanced multi-frame image of 3,000 frames has
~150,000 elements and items in all.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import IO, Any

from pydicom import filereader
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset

from dropvault.tasks.dicom.elements import PIXEL_TAGS

MAX_READS = 1_000_000  # reads of the file: ~400,000 elements, ~2 s of pydicom's walk
MAX_ITEMS = 100_000  # sequence items (pydicom builds a data set of ~1 KB for each)
MAX_ELEMENTS = 100_000  # top-level elements (a real header has hundreds)
_ITEM_TAGS = (b"\xfe\xff\x00\xe0", b"\xff\xfe\xe0\x00")  # (FFFE,E000), little and big endian


class TooManyElements(Exception):
    """The header has more elements or items than this module's bounds allow."""


class _CountedReads:
    """``fp``, failing once pydicom has made more than :data:`MAX_READS` reads of it or
    read more than :data:`MAX_ITEMS` item headers (8 bytes, tag (FFFE,E000))."""

    def __init__(self, fp: IO[bytes], items: int = MAX_ITEMS) -> None:
        self._fp = fp
        self._reads = MAX_READS
        self._items = items
        self.exceeded = False
        self.name = getattr(fp, "name", "<no filename>")  # pydicom quotes it in errors

    def read(self, size: int = -1) -> bytes:
        self._reads -= 1
        data = self._fp.read(size)
        if size == 8 and data[:4] in _ITEM_TAGS:
            self._items -= 1
        if self._reads < 0 or self._items < 0:
            self.exceeded = True
            raise TooManyElements
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fp.seek(offset, whence)

    def tell(self) -> int:
        return self._fp.tell()


def _stop(before_pixels: bool, elements: int) -> Callable[[Any, Any, int], bool]:
    seen = 0

    def stop_when(tag: Any, _vr: Any, _length: int) -> bool:
        nonlocal seen
        if before_pixels and tag in PIXEL_TAGS:
            return True
        seen += 1
        if seen > elements:
            raise TooManyElements
        return False

    return stop_when


def read_bounded(
    fp: IO[bytes],
    *,
    force: bool = False,
    stop_before_pixels: bool = False,
    specific_tags: list[int] | None = None,
    items: int = MAX_ITEMS,
) -> FileDataset:
    """``pydicom.dcmread`` of ``fp`` (left where pydicom stops), raising
    :class:`TooManyElements` past a bound (``items``: of sequence items). pydicom reads
    every value as it walks (none is deferred), so later look-ups never read ``fp``.

    A deflated file must not come here (pydicom would inflate and walk it unbounded):
    its callers refuse it or read it through :func:`read_inflated`."""
    reader = _CountedReads(fp, items)
    try:
        return filereader.read_partial(
            reader,  # type: ignore[arg-type]
            _stop(stop_before_pixels, MAX_ELEMENTS),
            force=force,
            specific_tags=specific_tags,
        )
    except Exception:
        # pydicom re-raises a failed item read as OSError: the bound is the reason.
        if reader.exceeded:
            raise TooManyElements from None
        raise


def read_inflated(meta: FileMetaDataset, inflated: bytes) -> Dataset:
    """The header of a deflated file whose data set was inflated within its bound
    (:func:`.guards.inflated_data_set`), read as pydicom reads the inflated buffer
    (explicit VR little endian, up to the pixel data) under the same bounds."""
    reader = _CountedReads(io.BytesIO(inflated))
    try:
        ds = filereader.read_dataset(
            reader,  # type: ignore[arg-type]
            is_implicit_VR=False,
            is_little_endian=True,
            stop_when=_stop(True, MAX_ELEMENTS),
        )
    except Exception:
        if reader.exceeded:
            raise TooManyElements from None
        raise
    ds.file_meta = meta
    return ds
