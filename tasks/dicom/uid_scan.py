"""The UIDs a file's bytes name, found without parsing it.

A damaged copy of a study's image (cut short, a bad header, no preamble, an element of
VR UN, a UID past the first MiB, a deflated data set) cannot be parsed, yet it still
names the study or the instance, and still carries the patient's name. Its quarantined
copy must go when the study is deleted, so ingest records keyed hashes of the UIDs its
bytes claim as its own (``quarantine_uids``), found by their element headers, and
deletion matches them. UID values are ASCII in every transfer syntax except the deflated
one, which is inflated here too.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Iterator
from typing import IO

from pydicom.uid import UID

from dropvault.tasks.dicom.filemeta import MetaUnforeseen, read_file_meta

MAX_UIDS = 1024  # a file naming more is hostile or not DICOM; the first ones suffice
# Element headers of an identity tag looked at (a real file has a handful): bytes packed
# with the tags once cost ~10 s per 12 MiB, up to ~100 s for one rejected file.
MAX_CANDIDATES = 16 * MAX_UIDS
# How far into a file (and into its inflated data set) the UIDs are looked for: the
# header that names them comes before the pixel data; a deflate bomb stops here.
SCAN_BYTES = 64 << 20
MAX_UID_LEN = 64
CHUNK = 1 << 20
OVERLAP = 96  # an element header and a whole UID value: what a chunk's end may cut
# Transfer syntaxes, SOP classes and the like: DICOM's own root, never a study's UID.
DICOM_ROOT = "1.2.840.10008."
DEFLATED = b"1.2.840.10008.1.2.1.99"
_LONG_VR = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT"}
# The elements by which a file says which study and instance it is: only a UID found as
# one of these counts (an implementation, frame of reference or referenced UID is shared
# by other files, and matching it would take other patients' files).
IDENTITY_TAGS = {
    (0x0002, 0x0003): "MediaStorageSOPInstanceUID",
    (0x0008, 0x0018): "SOPInstanceUID",
    (0x0020, 0x000D): "StudyInstanceUID",
}
# A lookahead: a big-endian tag may overlap a little-endian one by a byte.
_TAG = re.compile(
    b"(?=(?:"
    + b"|".join(
        re.escape(struct.pack(order, g, e)) for g, e in IDENTITY_TAGS for order in ("<HH", ">HH")
    )
    + b"))"
)
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)+")


def uids_named(src: IO[bytes], max_bytes: int = SCAN_BYTES) -> set[str]:
    """The study and instance UIDs the file's bytes claim as its own (values of
    :data:`IDENTITY_TAGS` in explicit or implicit VR, little or big endian, or as VR UN),
    in its first ``max_bytes`` and in its inflated data set when it is deflated; at most
    :data:`MAX_UIDS`."""
    found: set[str] = set()
    head = bytearray()

    def reads() -> Iterator[bytes]:
        left = max_bytes
        while left > 0 and (data := src.read(min(CHUNK, left))):
            left -= len(data)
            if len(head) < CHUNK:
                head.extend(data[: CHUNK - len(head)])
            yield data

    budget = _collect(reads(), found, MAX_CANDIDATES)
    start = _deflated_start(bytes(head))
    if start is not None and len(found) < MAX_UIDS and budget > 0:
        try:
            src.seek(start)
        except (OSError, ValueError):
            return found
        _collect(_inflated(src, max_bytes), found, budget)
    return found


def _collect(parts: Iterator[bytes], found: set[str], budget: int) -> int:
    """Identity UIDs in a stream of chunks (each scanned with the end of the one before,
    so an element cut by a chunk's end is still read), looking at ``budget`` tags at
    most; returns what is left of it."""
    tail = b""
    for part in parts:
        data = tail + part
        for match in _TAG.finditer(data):
            budget -= 1
            value = _value_after(data, match.start() + 4)
            if value is not None:
                found.add(value)
            if len(found) >= MAX_UIDS or budget <= 0:
                return budget
        tail = data[-OVERLAP:]
    return budget


def _value_after(data: bytes, at: int) -> str | None:
    """The UID an element header starting right before ``at`` holds, if any: explicit VR
    ``UI``/``UN`` (either byte order) or implicit VR (a 4-byte length)."""
    header = data[at : at + 8]
    candidates = []
    if header[:2] == b"UI":
        candidates += [(2, 2, "<H"), (2, 2, ">H")]
    if header[:4] == b"UN\0\0":
        candidates += [(4, 4, "<I"), (4, 4, ">I")]
    candidates += [(0, 4, "<I"), (0, 4, ">I")]
    for skip, size, fmt in candidates:
        if len(data) < at + skip + size:
            continue
        length = struct.unpack_from(fmt, data, at + skip)[0]
        if not 0 < length <= MAX_UID_LEN:
            continue
        start = at + skip + size
        raw = data[start : start + length]
        if len(raw) < length:
            continue
        text = raw.rstrip(b"\0 ").decode("ascii", "replace")
        if _UID.fullmatch(text) and not text.startswith(DICOM_ROOT) and UID(text).is_valid:
            return text
    return None


def _inflated(src: IO[bytes], max_bytes: int) -> Iterator[bytes]:
    """A deflated data set, inflated as far as it goes (a cut copy up to the cut), never
    past ``max_bytes`` of output (a deflate bomb stops there)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    budget = max_bytes
    while budget > 0 and (data := src.read(CHUNK)):
        while data and budget > 0:
            try:
                out = inflater.decompress(data, min(budget, CHUNK))
            except zlib.error:
                return
            budget -= len(out)
            yield out
            data = inflater.unconsumed_tail


def _deflated_start(head: bytes) -> int | None:
    """Where a deflated data set starts: by pydicom's own reading of the file meta (an
    implicit VR meta included), else, for a meta cut or too long for it, by a walk of an
    explicit VR one; None when the file is not deflated."""
    try:
        meta = read_file_meta(head, len(head) + (len(head) >= CHUNK), force=True)
    except MetaUnforeseen:
        meta = None
    if meta is not None and meta.deflated:
        return meta.dataset_start
    return _meta_end(head) if DEFLATED in head else None


def _meta_end(head: bytes) -> int | None:
    """Where the data set starts after the file meta group (explicit VR little endian,
    always), found by walking its elements; None when there is no meta group."""
    pos = 132 if head[128:132] == b"DICM" else 0
    seen = False
    while pos + 8 <= len(head):
        group = struct.unpack_from("<H", head, pos)[0]
        if group != 0x0002:
            return pos if seen else None
        vr = head[pos + 4 : pos + 6]
        if vr in _LONG_VR:
            if pos + 12 > len(head):
                return None
            length = struct.unpack_from("<I", head, pos + 8)[0]
            pos += 12 + length
        else:
            length = struct.unpack_from("<H", head, pos + 6)[0]
            pos += 8 + length
        seen = True
    return None
