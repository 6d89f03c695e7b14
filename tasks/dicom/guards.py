"""Guards that run before pydicom sees a file: the polyglot preamble, a cut file meta
and a deflate bomb."""

from __future__ import annotations

import struct
import zlib
from typing import IO

from pydicom.dataset import FileMetaDataset

from dropvault.tasks.dicom.elements import Decline, file_meta
from dropvault.tasks.dicom.filemeta import HEAD_BYTES, MetaUnforeseen, read_file_meta
from dropvault.tasks.dicom.header import DicomRejected
from dropvault.tasks.reasons import QuarantineReason

# A deflated data set may inflate to at most this much (it is held whole in memory, as
# pydicom does). Deflate is used for reports and small images; 16 MiB is a 2,900 x 2,900
# 16-bit image.
MAX_INFLATED = 16 << 20

EXECUTABLE_MAGIC = (b"MZ", b"\x7fELF", b"\xcf\xfa\xed\xfe", b"\xfe\xed\xfa\xcf", b"#!")


def check_preamble(head: bytes) -> None:
    """A preamble that is an executable header makes a DICOM/PE or DICOM/ELF polyglot
    (CVE-2019-11687): such a file is refused even when the rest is a valid image."""
    if head.startswith(EXECUTABLE_MAGIC):
        raise DicomRejected(QuarantineReason.NOT_DICOM, "the preamble is an executable header")


def check_meta_whole(fp: IO[bytes], size: int) -> None:
    """A file meta element that runs past the end of the file is a cut file (pydicom would
    read the cut transfer syntax as an unknown one)."""
    head = fp.read(min(size, 65536))
    fp.seek(0)
    if head[128:132] != b"DICM":
        return
    try:
        file_meta(head)
    except Decline:
        if len(head) == size:
            raise DicomRejected(QuarantineReason.TRUNCATED, "file meta is cut short") from None
    except struct.error:
        raise DicomRejected(QuarantineReason.TRUNCATED, "file meta is cut short") from None


def inflated_data_set(fp: IO[bytes], size: int) -> tuple[FileMetaDataset, bytes] | None:
    """A deflated file's meta and its data set inflated, within :data:`MAX_INFLATED`
    (a deflate bomb is refused); None for any other file.

    pydicom would inflate the whole rest of the file in memory and then walk it with no
    bound, so the parse of a deflated file reads this instead (:mod:`.budget`). Whether
    the file is deflated is pydicom's own reading of its meta (:mod:`.filemeta`); a meta
    too long to read here is refused.
    """
    head = fp.read(min(size, HEAD_BYTES))
    fp.seek(0)
    try:
        meta = read_file_meta(head, size, force=False)
    except MetaUnforeseen:
        raise DicomRejected(QuarantineReason.NOT_DICOM, "file meta is too large") from None
    if meta is None or not meta.deflated:
        return None
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    fp.seek(meta.dataset_start)
    out = bytearray()
    pending = b""
    try:
        while not inflater.eof:
            if not pending:
                pending = fp.read(1024 * 1024)
                if not pending:
                    break
            # At most 1 MiB out per step: the memory stays bounded whatever the ratio.
            try:
                out += inflater.decompress(pending, 1024 * 1024)
            except zlib.error as exc:
                raise DicomRejected(
                    QuarantineReason.NOT_DICOM, "deflated dataset does not inflate"
                ) from exc
            pending = inflater.unconsumed_tail
            if len(out) > MAX_INFLATED:
                raise DicomRejected(
                    QuarantineReason.NOT_DICOM, "deflated dataset inflates past the limit"
                )
    finally:
        fp.seek(0)
    if not inflater.eof:
        # pydicom's zlib.decompress refuses a stream cut short: so does the ingest.
        raise DicomRejected(QuarantineReason.TRUNCATED, "deflated dataset is cut short")
    return meta.dataset, bytes(out)
