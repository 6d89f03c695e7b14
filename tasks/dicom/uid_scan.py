"""The UIDs a file's bytes name, found without parsing it.

A damaged copy of a study's image (cut short, a bad header, no preamble, an element of
VR UN, a UID past the first MiB, a deflated data set) cannot be parsed, yet it still
names the study, its series or the instance, and still carries the patient's name. Its
quarantined copy must go when the study is deleted, so ingest records keyed hashes of
every UID its bytes hold (``quarantine_uids``), and deletion matches them. UID values
are ASCII in every transfer syntax except the deflated one, which is inflated here too.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Iterator
from typing import IO

from pydicom.uid import UID

MAX_UIDS = 1024  # a file naming more is hostile or not DICOM; the first ones suffice
MAX_UID_LEN = 64
CHUNK = 1 << 20
_RUN = re.compile(rb"[0-9.]+")
_TOKEN = re.compile(r"[0-9]+(?:\.[0-9]+)+")
# Transfer syntaxes, SOP classes and the like: DICOM's own root, never a study's UID.
DICOM_ROOT = "1.2.840.10008."
DEFLATED = b"1.2.840.10008.1.2.1.99"
_LONG_VR = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT"}


def uids_named(src: IO[bytes], max_bytes: int) -> set[str]:
    """Every valid UID (outside DICOM's own root) in the first ``max_bytes`` of ``src``,
    and in its inflated data set when it is deflated; at most :data:`MAX_UIDS`."""
    found: set[str] = set()
    head = bytearray()

    def reads() -> Iterator[bytes]:
        left = max_bytes
        while left > 0 and (data := src.read(min(CHUNK, left))):
            left -= len(data)
            if len(head) < CHUNK:
                head.extend(data[: CHUNK - len(head)])
            yield data

    _collect(_runs(reads()), found)
    start = _meta_end(bytes(head)) if DEFLATED in head else None
    if start is not None and len(found) < MAX_UIDS:
        try:
            src.seek(start)
        except (OSError, ValueError):
            return found
        _collect(_runs(_inflated(src, max_bytes)), found)
    return found


def _runs(parts: Iterator[bytes]) -> Iterator[bytes]:
    """Runs of UID characters across chunk boundaries (a run cut by a chunk's end is
    carried into the next; a run longer than a UID is no UID and is cut short)."""
    carry = b""
    for part in parts:
        data = carry + part
        runs = _RUN.findall(data)
        carry = b""
        if runs and data.endswith(runs[-1]):
            carry = runs.pop()[-(MAX_UID_LEN + 1) :]
        yield from runs
    if carry:
        yield carry


def _collect(runs: Iterator[bytes], found: set[str]) -> None:
    for run in runs:
        if len(run) < 3:
            continue
        for token in _TOKEN.findall(run.decode("ascii")):
            if (
                len(token) <= MAX_UID_LEN
                and not token.startswith(DICOM_ROOT)
                and UID(token).is_valid
            ):
                found.add(token)
                if len(found) >= MAX_UIDS:
                    return


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
