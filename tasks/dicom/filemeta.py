"""The file meta group as pydicom itself reads it, so a guard's view of the transfer
syntax is the parser's.

A guard that looked for the deflated transfer syntax as a substring of the first 64 KiB
was misled twice by an outside review: a 70,000-byte (0002,0102) element pushed the
transfer syntax past the window, and a file meta written in implicit VR (which pydicom
re-reads as such) did not parse in the guard's own walk. Either way pydicom still
inflated a deflate bomb whole. Here pydicom's own readers (preamble, file meta, command
set: the steps ``read_partial`` takes before it inflates) run over a bounded head.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from pydicom import filereader
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import DeflatedExplicitVRLittleEndian

# A file meta group is a few hundred bytes; one longer than this is not read here, and
# the ingest refuses the file rather than let pydicom decide past what was checked.
MAX_META_BYTES = 64 << 10
HEAD_BYTES = 132 + MAX_META_BYTES


class MetaUnforeseen(Exception):
    """What pydicom would make of this file's meta cannot be told from its first
    :data:`HEAD_BYTES`: the meta (or command set) runs past them."""


@dataclass(frozen=True)
class FileMeta:
    """``deflated``: pydicom will inflate everything from ``dataset_start`` on."""

    dataset: FileMetaDataset
    deflated: bool
    dataset_start: int


def read_file_meta(head: bytes, size: int, *, force: bool) -> FileMeta | None:
    """pydicom's reading of the meta group in ``head`` (a file's first bytes, of ``size``
    in all); None where pydicom's own read fails the same way (no DICM prefix unless
    ``force``, a meta that does not parse), so the parse that follows rejects the file.

    Raises :class:`MetaUnforeseen` when the meta may run past ``head``."""
    head = head[:HEAD_BYTES]
    fp = io.BytesIO(head)
    try:
        filereader.read_preamble(fp, force)
    except InvalidDicomError:
        return None  # no DICM prefix: pydicom refuses the file before any meta
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meta = filereader._read_file_meta_info(fp)  # noqa: SLF001 - pydicom's own step
            filereader._read_command_set_elements(fp)  # noqa: SLF001
            syntax = meta.get("TransferSyntaxUID")
    except Exception as exc:  # noqa: BLE001 - pydicom's read fails on these bytes too
        if len(head) < size:
            raise MetaUnforeseen from exc
        return None
    if fp.tell() >= len(head) and len(head) < size:
        raise MetaUnforeseen
    return FileMeta(meta, syntax == DeflatedExplicitVRLittleEndian, fp.tell())


def may_inflate(head: bytes, *, force: bool) -> bool:
    """Whether pydicom, reading just ``head``, might inflate a deflated data set: the
    readers that must never do so (a drop's DICOMDIR, a rejected file's study hint) skip
    such bytes. A meta past :data:`HEAD_BYTES` counts as one that might."""
    try:
        meta = read_file_meta(head, len(head), force=force)
    except MetaUnforeseen:
        return True
    return meta is not None and meta.deflated
