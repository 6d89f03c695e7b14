"""Guards that run before pydicom sees a file: the polyglot preamble, a cut file meta
and a deflate bomb."""

from __future__ import annotations

import struct
import zlib
from typing import IO

from dropvault.tasks.dicom.elements import Decline, file_meta
from dropvault.tasks.dicom.header import DEFLATED, DicomRejected
from dropvault.tasks.reasons import QuarantineReason

# A deflated dataset may inflate to at most this much (pydicom inflates it whole in memory).
MAX_INFLATED = 64 * 1024 * 1024

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


def check_inflated_size(fp: IO[bytes], size: int) -> None:
    """Refuse a deflated dataset that inflates past :data:`MAX_INFLATED` (a deflate bomb).

    pydicom inflates the whole dataset in memory, so this runs first, streaming and
    counting without keeping the output.
    """
    head = fp.read(min(size, 65536))
    fp.seek(0)
    if DEFLATED.encode() not in head:
        return
    try:
        meta, start = file_meta(head)
    except (Decline, struct.error):
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
