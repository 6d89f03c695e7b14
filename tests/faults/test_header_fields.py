"""The header fields the catalog reads, made hostile: pydicom converts a value only when it
is read, outside any bound on its walk, so a sequence, a million values or a long charset
where a number or a UID belongs cost one file 20-90 s and up to 4.5 GB, and a bare
OSError from that conversion failed every facility's batch (an outside review's files)."""

from __future__ import annotations

import random
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from dropvault.storage.home import Home
from dropvault.tasks import samples
from dropvault.tasks.dicom import header_from_bytes, read_header
from dropvault.tasks.drops import scan_drops
from dropvault.tasks.ingest import ingest_batch
from tests.faults.hostile import SEQ_END, element, rejection_cost, split

pytestmark = pytest.mark.integration

CPU_SECONDS = 5.0  # under tracemalloc; the review measured 15-92 s without it
PEAK_BYTES = 96 << 20  # beyond the input itself (up to 16 MiB here)
EMPTY_ITEM = struct.pack("<HHI", 0xFFFE, 0xE000, 0)


def _uid(value: str) -> bytes:
    raw = value.encode()
    return raw + b"\0" * (len(raw) % 2)


def _meta(deflated: bool = False) -> bytes:
    return split(samples._sample_bytes("image_dfl.dcm" if deflated else "CT_small.dcm"))[0]


def _uids(sop_instance: bytes | None = None) -> bytes:
    return (
        element(0x00080016, b"UI", _uid("1.2.840.10008.5.1.4.1.1.7"))
        + (sop_instance or element(0x00080018, b"UI", _uid(generate_uid())))
        + element(0x0020000D, b"UI", _uid(generate_uid()))
        + element(0x0020000E, b"UI", _uid(generate_uid()))
    )


def _values(mib: int, unit: bytes = b"1\\") -> bytes:
    body = unit * ((mib << 20) // len(unit))
    return body[:-1] + b" "


def rows_as_a_short_sequence() -> bytes:
    """240 bytes: Rows of VR SQ holding half an item header (a bare OSError once)."""
    return _meta() + _uids() + element(0x00280010, b"SQ", EMPTY_ITEM[:4])


def rows_as_a_sequence_of_empty_items() -> bytes:
    return _meta() + _uids() + element(0x00280010, b"SQ", EMPTY_ITEM * (1 << 20))


def deflated_rows_as_a_sequence() -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = _uids() + element(0x00280010, b"SQ", EMPTY_ITEM * ((15 << 20) // 8))
    return _meta(deflated=True) + packer.compress(body) + packer.flush()


def charset_of_unknown_values() -> bytes:
    return _meta() + element(0x00080005, b"UC", _values(1, b"x\\")) + _uids()


def charset_inside_an_item() -> bytes:
    """Stand-alone and unknown values in a sequence item, where no top-level check sees
    them (pydicom never defers a charset's value, and removes stand-alone ones from the
    middle of a list: quadratic)."""
    charset = element(0x00080005, b"UC", _values(1, b"ISO 2022 IR 6\\GBK\\"))
    inner = struct.pack("<HHI", 0xFFFE, 0xE000, len(charset)) + charset
    sequence = element(0x00081140, b"SQ", b"", length=0xFFFFFFFF) + inner + SEQ_END
    return _meta() + _uids() + sequence


def _items_with_charsets(count: int, charset: bytes) -> bytes:
    value = element(0x00080005, b"CS", charset)
    one = struct.pack("<HHI", 0xFFFE, 0xE000, len(value)) + value
    return element(0x00081115, b"SQ", b"", length=0xFFFFFFFF) + one * count + SEQ_END


def items_with_long_charsets() -> bytes:
    """2,000 items, each a 1,022-byte charset of 511 unknown terms: pydicom looks each
    term up, twice, for every item (24 s for the deflated form)."""
    return _meta() + _uids() + _items_with_charsets(2000, b"X\\" * 510 + b"X ")


def deflated_items_with_long_charsets() -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = _uids() + _items_with_charsets(2000, b"X\\" * 510 + b"X ")
    return _meta(deflated=True) + packer.compress(body) + packer.flush()


def many_items_with_charsets() -> bytes:
    return _meta() + _uids() + _items_with_charsets(1000, b"ISO_IR 100\\ISO_IR 192")


def frames_of_a_million_values() -> bytes:
    return _meta() + _uids() + element(0x00280008, b"UC", _values(8))


def sop_instance_of_a_million_uids() -> bytes:
    return _meta() + _uids(element(0x00080018, b"UC", _values(8, b"1.2.3\\")))


HOSTILE: dict[str, Callable[[], bytes]] = {
    "Rows as a 4-byte sequence": rows_as_a_short_sequence,
    "Rows as 8 MiB of empty items": rows_as_a_sequence_of_empty_items,
    "deflated, Rows as 15 MiB of empty items": deflated_rows_as_a_sequence,
    "a charset of 1 MiB of unknown values": charset_of_unknown_values,
    "a charset of 1 MiB inside an item": charset_inside_an_item,
    "2,000 items with 1 KiB charsets": items_with_long_charsets,
    "deflated, 2,000 items with 1 KiB charsets": deflated_items_with_long_charsets,
    "1,000 items with short charsets": many_items_with_charsets,
    "NumberOfFrames of 8 MiB of values": frames_of_a_million_values,
    "SOPInstanceUID of 8 MiB of UIDs": sop_instance_of_a_million_uids,
}


@pytest.mark.parametrize("make", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_field_is_refused_before_it_is_converted(make: Callable[[], bytes]) -> None:
    data = make()
    rejected, seconds, peak = rejection_cost(lambda: header_from_bytes(data))
    assert rejected.reason == "not_dicom", rejected.detail
    assert seconds < CPU_SECONDS
    assert peak - len(data) < PEAK_BYTES


def test_a_240_byte_file_does_not_fail_another_facilitys_batch(tmp_path: Path) -> None:
    """The file that once failed every batch it landed in: it is quarantined, and the
    other facility's files in the same batch are cataloged."""
    home = Home.init(tmp_path / "home")
    home.catalog.migrate()
    rng = random.Random(5)
    _, good = samples.make_study(rng, samples.make_patient(rng, 1), 2, "MR_small.dcm")
    samples.write_drop(home.drops, "good", "d1", good, manifest=False)
    samples.write_drop(
        home.drops, "evil", "d1", {"x.dcm": rows_as_a_short_sequence()}, manifest=False
    )
    drops = scan_drops(home.drops, home.pepper, time.time(), 0, 3600, catalog=home.catalog)
    stats = ingest_batch(home, [(d, f) for d in drops for f in d.files], max_file_bytes=1 << 30)
    assert stats.ingested == 2
    assert dict(stats.quarantined) == {"not_dicom": 1}


def test_a_large_private_value_is_skipped_not_read(tmp_path: Path) -> None:
    """A header value of 512 MiB (a private blob; an overlay or an icon, when honest) was
    read whole into memory by pydicom. It is skipped: the catalog never reads it."""
    head = _meta() + _uids()
    length = (512 << 20) - len(head) - 12
    path = tmp_path / "big.dcm"
    with path.open("wb") as out:
        out.write(head + element(0x00091010, b"OB", b"", length=length))
        out.truncate(len(head) + 12 + length)  # sparse: zeros on read
    size = path.stat().st_size
    with path.open("rb") as fp:  # no pixel data in a CT image: refused, cheaply
        _, seconds, peak = rejection_cost(lambda: read_header(fp, size))
    assert seconds < CPU_SECONDS
    assert peak < 16 << 20


def test_elements_after_the_pixel_data_are_bounded(tmp_path: Path) -> None:
    """A streamed image followed by empty elements: each is a seek and a read (64 MiB of
    them took 13 s, and the file was accepted). Past MAX_TRAILING it is not an image."""
    image = samples._sample_bytes("CT_small.dcm")
    trailing = struct.pack("<HH2sH", 0x0009, 0x0010, b"LO", 0) * (1 << 17)  # 1 MiB
    path = tmp_path / "trailing.dcm"
    path.write_bytes(image + trailing)
    with path.open("rb") as fp:
        rejected, seconds, _ = rejection_cost(lambda: read_header(fp, len(image) + len(trailing)))
    assert rejected.detail == "too many elements after the pixel data"
    assert seconds < CPU_SECONDS
    few = image + trailing[: 8 * 100]  # a hundred trailing elements: an image still
    path.write_bytes(few)
    with path.open("rb") as fp:
        assert read_header(fp, len(few)).rows == 128
