"""A corpus of hostile DICOM files, built in code from the samples pydicom ships.

Each entry is ``(label, bytes, reason)``: the quarantine reason the file must get.
"""

from __future__ import annotations

import io
import random
import struct
import time
import tracemalloc
import zlib
from collections.abc import Callable

import pydicom
from pydicom.uid import generate_uid

from dropvault.tasks import samples
from dropvault.tasks.dicom import DicomRejected
from dropvault.tasks.dicom.elements import file_meta as _file_meta

PREAMBLE = b"\0" * 128 + b"DICM"


def element(tag: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    """One explicit VR little endian element (``length`` may lie)."""
    group, elem = tag >> 16, tag & 0xFFFF
    n = len(value) if length is None else length
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, n) + value
    return struct.pack("<HH2sH", group, elem, vr, n) + value


def item(body: bytes, undefined: bool = False) -> bytes:
    if undefined:
        return struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + body + ITEM_END
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body


ITEM_END = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
SEQ_END = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


def split(data: bytes) -> tuple[bytes, bytes]:
    """``(preamble and file meta, dataset)``."""
    _meta, start = _file_meta(data)
    return data[:start], data[start:]


def with_meta_syntax(data: bytes, syntax: str) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = syntax
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=False)
    return out.getvalue()


def element_starts(data: bytes) -> list[int]:
    """Offsets where each top-level element of the dataset (and of the meta) begins."""
    starts = []
    pos = 132
    size = len(data)
    head_len = {True: 12, False: 8}
    while pos + 8 <= size:
        starts.append(pos)
        group, elem, vr = struct.unpack_from("<HH2s", data, pos)
        if (group, elem) >= (0x7FE0, 0x0010):
            break
        long_vr = vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL")
        length = struct.unpack_from("<I" if long_vr else "<H", data, pos + (8 if long_vr else 6))[0]
        if length == 0xFFFFFFFF:
            break
        pos += head_len[long_vr] + length
    return starts


def corpus() -> list[tuple[str, bytes, str]]:
    """At least 30 hostile files with the reason each must be quarantined for."""
    rng = random.Random(7)
    patient = samples.make_patient(rng, 0)
    ct = samples.make_instance(patient, generate_uid(), generate_uid(), "CT_small.dcm")
    mr = samples.make_instance(patient, generate_uid(), generate_uid(), "MR_small.dcm")
    rle = samples._sample_bytes("SC_rgb_rle.dcm")
    meta, dataset = split(ct)
    starts = element_starts(ct)
    pixel_at = starts[-1]
    out: list[tuple[str, bytes, str]] = [
        ("zero bytes", b"", "not_dicom"),
        ("text file", samples.not_dicom() * 10, "not_dicom"),
        (
            "PE executable",
            b"MZ\x90\x00" + bytes(rng.randrange(256) for _ in range(400)),
            "not_dicom",
        ),
        ("ELF executable", b"\x7fELF\x02\x01\x01" + b"\0" * 500, "not_dicom"),
        ("DICM at the wrong offset", b"\0" * 64 + b"DICM" + dataset, "not_dicom"),
        ("random bytes after DICM", PREAMBLE + rng.randbytes(5000), "not_dicom"),
        ("PE preamble before a good file", b"MZ" + ct[2:128] + ct[128:], "not_dicom"),
        ("preamble only", ct[:128], "not_dicom"),
        ("cut after DICM", ct[:132], "truncated"),
        ("cut inside the first meta header", ct[:137], "truncated"),
        ("cut inside a meta value", ct[: starts[2] + 10], "truncated"),
        ("cut at the end of the meta", meta, "truncated"),
        ("cut before the pixel element", ct[:pixel_at], "truncated"),
        ("cut inside the pixel header", ct[: pixel_at + 6], "truncated"),
        ("cut inside the pixel data", ct[: pixel_at + 200], "truncated"),
        ("one byte short", ct[:-1], "truncated"),
        ("cut inside an RLE fragment", rle[:-20], "truncated"),
        ("RLE without its sequence delimiter", rle[:-8], "truncated"),
        (
            "element claiming 4 GiB",
            meta + element(0x00091010, b"OB", b"\x01" * 64, length=0xFFFFFFF0) + dataset,
            "truncated",
        ),
        (
            "pixel data claiming 4 GiB",
            ct[:pixel_at] + element(0x7FE00010, b"OW", ct[pixel_at + 12 :], length=0xFFFFFFF0),
            "truncated",
        ),
        (
            "pixel data shorter than rows x columns",
            ct[:pixel_at] + element(0x7FE00010, b"OW", b"\0" * 100),
            "truncated",
        ),
        (
            "undefined-length SQ never closed",
            meta
            + element(
                0x00081140, b"SQ", item(b"\x08\x00" * 40, undefined=True)[:-8], length=0xFFFFFFFF
            ),
            "truncated",
        ),
        (
            "undefined-length OB in the header",
            meta + element(0x00091010, b"OB", b"\x01" * 64, length=0xFFFFFFFF),
            "truncated",
        ),
        ("bad transfer syntax", with_meta_syntax(ct, "1.2.3.4.5.6.7"), "not_dicom"),
        ("transfer syntax that is not a UID", with_meta_syntax(ct, "JPEG please"), "not_dicom"),
        ("deflate bomb", deflate_bomb(), "not_dicom"),
        # An outside review's: the transfer syntax pushed past the guard's old 64 KiB look.
        ("deflate bomb behind a 70,000-byte meta element", deflate_bomb(70_000), "not_dicom"),
        ("deflate bomb with an implicit VR file meta", implicit_meta_bomb(), "not_dicom"),
        ("deflated garbage", deflated_garbage(), "not_dicom"),
        ("deep nesting (5,000 levels)", deep_nesting(ct, 5000), "not_dicom"),
        ("no SOP Instance UID", samples.without(ct, "SOPInstanceUID"), "missing_uid"),
        ("no Study Instance UID", samples.without(mr, "StudyInstanceUID"), "missing_uid"),
        ("no Series Instance UID", samples.without(mr, "SeriesInstanceUID"), "missing_uid"),
        ("UID with letters", bad_uid(ct), "missing_uid"),
    ]
    return out


def deflate_bomb(meta_padding: int = 0) -> bytes:
    """A deflated-syntax file whose dataset inflates to 1 GiB of zeros (about 1 MB on disk);
    ``meta_padding``: bytes of a (0002,0102) element put before the transfer syntax."""
    meta, _ = split(samples._sample_bytes("image_dfl.dcm"))
    if meta_padding:
        meta = PREAMBLE + element(0x00020102, b"OB", b"A" * meta_padding) + meta[132:]
    return meta + _deflated_zeros(1024)


def _deflated_zeros(mib: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = b"\0" * (1 << 20)
    return b"".join(packer.compress(zeros) for _ in range(mib)) + packer.flush()


def deflated_zeros(mib: int) -> bytes:
    return split(samples._sample_bytes("image_dfl.dcm"))[0] + _deflated_zeros(mib)


def implicit_meta_bomb() -> bytes:
    """A deflate bomb whose file meta is implicit VR, which pydicom re-reads as such."""

    def implicit(tag: int, value: bytes) -> bytes:
        return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value

    meta = (
        implicit(0x00020010, b"1.2.840.10008.1.2.1.99\0")
        + implicit(0x00020002, b"1.2.840.10008.5.1.4.1.1.2\0")
        + implicit(0x00020003, b"1.2.3.4\0\0")
    )
    return PREAMBLE + meta + _deflated_zeros(1024)


def floods() -> dict[str, bytes]:
    """Headers that are all elements or items: pydicom's walk of them is what costs (an
    outside review's, at the sizes it measured)."""
    meta, _ = split(samples._sample_bytes("CT_small.dcm"))
    return {
        # 15 MiB of zeros inflated: 2 M empty elements under the inflate limit.
        "deflated flood of empty elements": deflated_zeros(15),
        "16 MiB of 8-byte private elements": private_flood(meta, 16),
        "1 MiB sequence of empty items": item_flood(meta, 1 << 17),
    }


def private_flood(meta: bytes, mib: int) -> bytes:
    """Distinct ascending private tags of VR LO and no value: 8 bytes an element."""
    n = (mib << 20) // 8
    pack = struct.Struct("<HH2sH").pack
    return meta + b"".join(pack(0x0009 + 2 * (i >> 16), i & 0xFFFF, b"LO", 0) for i in range(n))


def item_flood(meta: bytes, items: int) -> bytes:
    return (
        meta
        + element(0x00081140, b"SQ", b"", length=0xFFFFFFFF)
        + struct.pack("<HHI", 0xFFFE, 0xE000, 0) * items
        + SEQ_END
    )


def deflated_garbage() -> bytes:
    data = samples._sample_bytes("image_dfl.dcm")
    meta, _ = split(data)
    return meta + random.Random(3).randbytes(4000)


def deep_nesting(data: bytes, depth: int) -> bytes:
    """Sequences nested ``depth`` deep (well formed, every level closed)."""
    meta, dataset = split(data)
    open_ = (element(0x00081140, b"SQ", b"", length=0xFFFFFFFF) + item(b"", True)[:8]) * depth
    close = (ITEM_END + SEQ_END) * depth
    return meta + open_ + close + dataset


def bad_uid(data: bytes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.SOPInstanceUID = "1.2.840.ABC.DEF"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=False)
    return out.getvalue()


def rejection_cost(call: Callable[[], object]) -> tuple[DicomRejected, float, int]:
    """The :class:`DicomRejected` ``call`` must raise, with the CPU seconds and the peak
    traced memory it took (under tracemalloc, which slows pydicom ~4x)."""
    tracemalloc.start()
    started = time.process_time()
    try:
        call()
    except DicomRejected as exc:
        _, peak = tracemalloc.get_traced_memory()
        return exc, time.process_time() - started, peak
    finally:
        tracemalloc.stop()
    raise AssertionError("the file was accepted")
