"""Large images (over the in-memory limit): hashed as they are encrypted, one read of the
source, and every case that needs the hash first (known or repeated UID, rejected header,
manifest checksum, a source changed meanwhile) still decided as for a small file."""

from __future__ import annotations

import hashlib
import io
import os
import random
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from dropvault.storage.home import Home
from dropvault.storage.locations import FullReads
from dropvault.tasks import ingest as ingest_mod
from dropvault.tasks import samples
from dropvault.tasks.drops import scan_drops
from dropvault.tasks.ingest import IN_MEMORY_MAX, IngestStats, ingest_batch
from dropvault.tasks.quarantine import quarantine_export
from tests.conftest import make_home, s3_filesystem
from tests.helpers import sources


def big_image(seed: int, frames: int = 18) -> bytes:
    """A multi-frame MR image just over the in-memory limit (18 frames: 9.4 MB)."""
    out = io.BytesIO()
    rng = random.Random(seed)
    samples.write_multiframe(
        out,
        samples.make_patient(rng, seed),
        f"1.2.826.0.1.3680043.8.498.{seed + 1}",
        f"1.2.826.0.1.3680043.8.499.{seed + 1}",
        frames,
        seed=seed,
    )
    data = out.getvalue()
    assert len(data) > IN_MEMORY_MAX
    return data


def ingest(home: Home) -> IngestStats:
    """Every ready file of the drops, in one batch."""
    home.catalog.migrate()
    work = [
        (drop, f)
        for drop in scan_drops(home.drops, home.pepper, time.time() + 3600, 0, 86400)
        for f in drop.files
    ]
    return ingest_batch(home, work, max_file_bytes=10**9)


def one(home: Home, sql: str) -> Any:
    return home.catalog.query(sql).iloc[0, 0]


def images_left(home: Home) -> list[str]:
    """Sources still in the drops (a drop's manifest goes when the flow finishes it)."""
    return [e.name for e in sources(home.drops) if e.name.endswith(".dcm")]


def vault_names(home: Home) -> set[str]:
    return {e.name for e in home.vault.list()}


def cataloged_names(home: Home) -> set[str]:
    rows = home.catalog.query("SELECT name FROM objects WHERE kind = 'instance'")
    return set(rows["name"])


class Counting(FullReads):
    """A read handle that counts the bytes read through it."""

    def __init__(self, handle: IO[bytes], tally: list[int]) -> None:
        super().__init__(handle)
        self._tally = tally

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self._tally[0] += len(data)
        return data

    def fileno(self) -> int:
        return self._raw.fileno()


@pytest.fixture
def bytes_read(home: Home, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    tally = [0]
    plain = home.drops.open
    monkeypatch.setattr(home.drops, "open", lambda *a, **k: Counting(plain(*a, **k), tally))
    yield tally


def test_a_large_image_is_read_once_and_stored_whole(home: Home, bytes_read: list[int]) -> None:
    data = big_image(1)
    samples.write_drop(home.drops, "fac", "d1", {"big.dcm": data})
    stats = ingest(home)
    assert (stats.ingested, stats.duplicates, sum(stats.quarantined.values())) == (1, 0, 0)
    sha = hashlib.sha256(data).hexdigest()
    assert one(home, "SELECT sha256 FROM instances") == sha
    (name,) = cataloged_names(home)
    assert home.vault_store().digest(name) == (len(data), sha)
    assert vault_names(home) == {name} and images_left(home) == []
    if home.drops.has_change_tokens:  # local disk, S3: the header, then one pass
        assert bytes_read[0] < len(data) + 2 * 1024 * 1024
    else:  # memory://: nothing tells a changed source, so it is hashed first
        assert bytes_read[0] >= 2 * len(data)


def test_a_known_large_image_is_a_duplicate_and_a_changed_one_a_conflict(
    local_home: Home, tmp_path: Path
) -> None:
    home = local_home
    data = big_image(2)
    samples.write_drop(home.drops, "fac", "d1", {"a.dcm": data})
    assert ingest(home).ingested == 1
    samples.write_drop(home.drops, "fac", "d2", {"again.dcm": data})
    stats = ingest(home)
    assert (stats.ingested, stats.duplicates, stats.files_seen) == (0, 1, 1)
    other = samples.with_uid(data, samples.sop_uid(data), tweak=b"other content")
    samples.write_drop(home.drops, "fac", "d3", {"other.dcm": other})
    stats = ingest(home)
    assert stats.quarantined == {"uid_conflict": 1} and stats.files_seen == 1
    qid = one(home, "SELECT quarantine_id FROM quarantine WHERE reason = 'uid_conflict'")
    quarantine_export(home, str(qid), tmp_path / "q.dcm")
    assert (tmp_path / "q.dcm").read_bytes() == other
    assert one(home, "SELECT count(*) FROM instances") == 1
    assert vault_names(home) == cataloged_names(home) and images_left(home) == []


def test_two_copies_of_a_large_image_in_one_batch(local_home: Home) -> None:
    data = big_image(3)
    samples.write_drop(local_home.drops, "fac", "d1", {"a.dcm": data, "copy/a.dcm": data})
    stats = ingest(local_home)
    assert (stats.ingested, stats.duplicates, stats.files_seen) == (1, 1, 2)
    assert vault_names(local_home) == cataloged_names(local_home)


def test_a_large_image_failing_its_manifest_checksum_leaves_no_object(home: Home) -> None:
    data = big_image(4)
    changed = data[:-1] + bytes([data[-1] ^ 1])  # the manifest describes other bytes
    samples.write_drop(home.drops, "fac", "d1", {"big.dcm": data}, listed={"big.dcm": changed})
    stats = ingest(home)
    assert stats.quarantined == {"checksum_mismatch": 1} and stats.ingested == 0
    assert one(home, "SELECT count(*) FROM instances") == 0
    assert vault_names(home) == set()  # the one-pass object is gone, not left to reconcile


def test_a_large_image_with_a_cut_header_is_quarantined_with_its_bytes(
    local_home: Home, tmp_path: Path
) -> None:
    data = big_image(5)
    cut = data[:400]  # inside the header, then padding past the in-memory limit
    bad = cut + b"\0" * (IN_MEMORY_MAX + 1 - len(cut))
    samples.write_drop(local_home.drops, "fac", "d1", {"bad.dcm": bad}, manifest=False)
    stats = ingest(local_home)
    assert sum(stats.quarantined.values()) == 1 and stats.ingested == 0
    qid = one(local_home, "SELECT quarantine_id FROM quarantine")
    quarantine_export(local_home, str(qid), tmp_path / "q.dcm")
    assert (tmp_path / "q.dcm").read_bytes() == bad
    assert vault_names(local_home) == set()


def pixels_changed(data: bytes) -> bytes:
    """The same header and size, other pixel bytes."""
    return data[:-4096] + bytes(b ^ 0xFF for b in data[-4096:])


@pytest.mark.parametrize(
    ("point", "how"),
    [
        ("after_parse", "other_image_renamed_over"),
        ("after_parse", "other_image_in_place"),
        ("mid_encrypt", "pixels_in_place"),
    ],
)
def test_a_source_changed_after_its_header_was_read_is_never_cataloged_as_it_was(
    local_home: Home, point: str, how: str
) -> None:
    """The file changes after its header was parsed (another patient's image renamed over
    it or written into it; or its pixels rewritten as it is encrypted): no catalog row may
    pair a parsed header with bytes it was not parsed from, nor carry a hash of bytes other
    than those stored."""
    home = local_home
    first = big_image(6)
    second = pixels_changed(first) if how == "pixels_in_place" else big_image(7)
    samples.write_drop(home.drops, "fac", "d1", {"big.dcm": first}, manifest=False)
    path = Path(home.drops.root) / "fac" / "d1" / "big.dcm"
    fired: list[str] = []

    def swap() -> None:
        if fired:
            return
        fired.append(how)
        if how == "other_image_renamed_over":
            staged = path.with_name(".staged")
            staged.write_bytes(second)
            staged.replace(path)
        else:
            with path.open("r+b" if how == "pixels_in_place" else "wb") as fh:
                fh.write(second)

    ingest_mod.FAULTS[point] = swap
    try:
        stats = ingest(home)
    finally:
        ingest_mod.FAULTS.pop(point)
    assert fired
    rows = home.catalog.query("SELECT sop_instance_uid, sha256, object_id FROM instances")
    vault = home.vault_store()
    for uid, sha, object_id in rows.itertuples(index=False):
        with vault.open(vault.object_name(object_id)) as fh:
            stored = fh.read()
        assert hashlib.sha256(stored).hexdigest() == sha
        assert samples.sop_uid(stored) == uid
    if how == "pixels_in_place":  # same header and listed size: the new bytes go in now
        assert stats.ingested == 1
        assert list(rows["sha256"]) == [hashlib.sha256(second).hexdigest()]
    assert vault_names(home) == cataloged_names(home)


# -- what an outside review broke (2026-12-03) -----------------------------------------


def stored_bytes_match_rows(home: Home) -> None:
    """Every instance row's object decrypts to bytes of its hash, size and UID, and the
    vault holds no object without a row."""
    rows = home.catalog.query(
        "SELECT sop_instance_uid, sha256, size_bytes, object_id FROM instances"
    )
    vault = home.vault_store()
    for uid, sha, size, object_id in rows.itertuples(index=False):
        with vault.open(vault.object_name(object_id)) as fh:
            stored = fh.read()
        assert hashlib.sha256(stored).hexdigest() == sha
        assert len(stored) == size
        assert samples.sop_uid(stored) == uid
    assert vault_names(home) == cataloged_names(home)


def listed(home: Home) -> list[tuple[Any, Any]]:
    home.catalog.migrate()
    drops = scan_drops(home.drops, home.pepper, time.time() + 3600, 0, 86400)
    return [(drop, f) for drop in drops for f in drop.files]


def small_study(seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    _, files = samples.make_study(rng, samples.make_patient(rng, seed), 2, "CT_small.dcm")
    return files


PHI_FOLDER, PHI_NAME = "Doe_John_19700101", "JOHN_DOE_brain.dcm"


@pytest.mark.parametrize("how", ["removed", "symlink", "removed_after_parse"])
def test_a_large_file_gone_or_refused_after_the_listing_fails_alone(
    local_home: Home, tmp_path: Path, how: str
) -> None:
    """Another run took it, a symlink was put in its place, or it went between the parse
    and the encryption: the batch's other files are ingested, the refused one is reported
    unreadable and left, and nothing escapes with the file's name in it."""
    home = local_home
    files = {**small_study(31), PHI_NAME: big_image(32)}
    samples.write_drop(home.drops, "fac", PHI_FOLDER, files, manifest=False)
    work = listed(home)
    path = Path(home.drops.root) / "fac" / PHI_FOLDER / PHI_NAME
    if how == "symlink":
        elsewhere = tmp_path / "elsewhere.dcm"
        elsewhere.write_bytes(big_image(33))
        path.unlink()
        path.symlink_to(elsewhere)
    elif how == "removed":
        path.unlink()
    else:
        ingest_mod.FAULTS["after_parse"] = path.unlink
    try:
        stats = ingest_batch(home, work, max_file_bytes=10**9)
    finally:
        ingest_mod.FAULTS.pop("after_parse", None)
    assert stats.ingested == 2
    assert stats.files_seen == (3 if how == "symlink" else 2)
    assert dict(stats.quarantined) == ({"unreadable": 1} if how == "symlink" else {})
    assert images_left(home) == ([f"fac/{PHI_FOLDER}/{PHI_NAME}"] if how == "symlink" else [])
    stored_bytes_match_rows(home)


def test_a_name_flipped_between_the_reads_of_a_two_pass_file_is_left(local_home: Home) -> None:
    """A large file whose UID is known is hashed, parsed and encrypted through three opens.
    The name is flipped between two images (a hard link renamed over it): A when hashed,
    B when parsed, A again when encrypted. No row may pair B's header with A's bytes."""
    home = local_home
    a, b = big_image(21), big_image(22)
    earlier = samples.with_uid(a, samples.sop_uid(a), tweak=b"earlier")
    samples.write_drop(home.drops, "fac", "d0", {"x.dcm": earlier}, manifest=False)
    assert ingest(home).ingested == 1
    samples.write_drop(home.drops, "fac", "d1", {"big.dcm": a}, manifest=False)
    path = Path(home.drops.root) / "fac" / "d1" / "big.dcm"
    stash = Path(home.drops.root).parent / "stash"
    stash.mkdir()
    (stash / "a").write_bytes(a)
    (stash / "b").write_bytes(b)

    def put(which: str) -> None:
        staged = stash / ".staged"
        staged.hardlink_to(stash / which)
        staged.replace(path)

    plain_parse = ingest_mod._Batch.parse

    def parse(self: Any, reads: list[Any]) -> Any:
        if self.one_pass:
            return plain_parse(self, reads)
        put("b")
        try:
            return plain_parse(self, reads)
        finally:
            put("a")

    ingest_mod._Batch.parse = parse  # type: ignore[method-assign]
    try:
        stats = ingest(home)
    finally:
        ingest_mod._Batch.parse = plain_parse  # type: ignore[method-assign]
    assert stats.ingested == 0 and stats.sources_changed == 1
    assert images_left(home) == ["fac/d1/big.dcm"]
    stored_bytes_match_rows(home)
    # Left as it is now: the next run decides it (A's UID with other content: a conflict).
    again = ingest(home)
    assert dict(again.quarantined) == {"uid_conflict": 1}
    stored_bytes_match_rows(home)


def test_a_large_file_cut_after_the_listing_is_not_cataloged(
    local_home: Home, tmp_path: Path
) -> None:
    """A stalled re-upload: the listed file is cut short before it is read. The cut image
    is not cataloged under the listing's size; the next listing sees it as it is (and
    quarantines it), and the whole image, once there, is ingested."""
    home = local_home
    data = big_image(15)
    samples.write_drop(home.drops, "fac", "d1", {"big.dcm": data}, manifest=False)
    work = listed(home)
    path = Path(home.drops.root) / "fac" / "d1" / "big.dcm"
    path.write_bytes(data[: len(data) - 3 * 1024 * 1024])
    stats = ingest_batch(home, work, max_file_bytes=10**9)
    assert stats.ingested == 0 and stats.sources_changed == 1
    assert vault_names(home) == set() and images_left(home) == ["fac/d1/big.dcm"]
    assert dict(ingest(home).quarantined) == {"truncated": 1}
    path.write_bytes(data)
    assert ingest(home).ingested == 1
    stored_bytes_match_rows(home)
    with home.vault_store().open(next(iter(cataloged_names(home)))) as fh:
        assert fh.read() == data


@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("point", ["after_vault_write", "after_commit"])
def test_a_source_rewritten_in_place_with_its_mtime_put_back_is_not_removed(
    local_home: Home, point: str, size: str
) -> None:
    """After the last read, the facility writes another image of the same size into the
    file and puts its mtime back (``cp -p``, ``rsync -t``). Size and mtime match the
    listing; the change time does not, so the source stays and the next run takes it."""
    home = local_home
    first = big_image(16) if size == "large" else next(iter(small_study(16).values()))
    second = samples.with_uid(first, "1.2.826.0.1.3680043.8.498.999016")
    second = second[: len(first)] + b"\0" * (len(first) - len(second))
    samples.write_drop(home.drops, "fac", "d1", {"f.dcm": first}, manifest=False)
    path = Path(home.drops.root) / "fac" / "d1" / "f.dcm"

    def rewrite() -> None:
        st = path.stat()
        with path.open("r+b") as fh:
            fh.write(second)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    ingest_mod.FAULTS[point] = rewrite
    try:
        stats = ingest(home)
    finally:
        ingest_mod.FAULTS.pop(point)
    assert stats.sources_changed == 1 and path.read_bytes() == second
    ingest(home)
    shas = set(home.catalog.query("SELECT sha256 FROM instances")["sha256"])
    assert hashlib.sha256(second).hexdigest() in shas
    stored_bytes_match_rows(home)


def test_an_s3_object_replaced_or_deleted_during_the_ingest_fails_alone(
    tmp_path: Path, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On S3 a replaced object fails the encryption's pinned ranged read (s3fs's
    FileExpired: the object is read in 5 MiB blocks, the second after the replacement) and
    a deleted one its open: each is left for the next run, the batch's other files are
    ingested, and no mix of two versions is stored."""
    home = make_home("s3", tmp_path, moto_endpoint)
    a, b = big_image(51), big_image(52)
    files = {**small_study(50), "replaced.dcm": a, "deleted.dcm": big_image(53)}
    samples.write_drop(home.drops, "fac", "d1", files, manifest=False)
    fs = s3_filesystem(moto_endpoint)
    plain_open = home.drops.open

    class Replacing(FullReads):
        """Replaces the object once the first MiB was read through this handle."""

        done = False

        def read(self, size: int | None = -1) -> bytes:
            data = super().read(size)
            if not Replacing.done:
                Replacing.done = True
                fs.pipe(home.drops.path("fac/d1/replaced.dcm"), b)
            return data

    opened: list[str] = []

    def opening(name: str, *args: Any, **kwargs: Any) -> IO[bytes]:
        handle = plain_open(name, *args, **kwargs)
        opened.append(name)
        if name.endswith("replaced.dcm") and opened.count(name) == 2:  # parse, then encrypt
            return Replacing(handle)  # type: ignore[return-value]
        return handle

    monkeypatch.setattr(home.drops, "open", opening)
    ingest_mod.FAULTS["after_parse"] = lambda: fs.rm(home.drops.path("fac/d1/deleted.dcm"))
    try:
        stats = ingest(home)
    finally:
        ingest_mod.FAULTS.pop("after_parse")
    assert Replacing.done
    assert stats.ingested == 2  # the small study
    assert sorted(images_left(home)) == ["fac/d1/replaced.dcm"]
    stored_bytes_match_rows(home)
    monkeypatch.setattr(home.drops, "open", plain_open)
    assert ingest(home).ingested == 1
    stored_bytes_match_rows(home)


def test_a_quarantined_large_file_rewritten_before_its_copy_is_left_not_lost(
    local_home: Home, tmp_path: Path
) -> None:
    """A conflicting large file is hashed (A), then its upload restarts (the file is cut)
    before its quarantine copy is written. The cut bytes are not kept under A's id: the
    file is left, and once whole again the next run quarantines A itself."""
    home = local_home
    known = big_image(301)
    samples.write_drop(home.drops, "fac", "d0", {"k.dcm": known}, manifest=False)
    assert ingest(home).ingested == 1
    a = samples.with_uid(known, samples.sop_uid(known), tweak=b"re-scan")
    samples.write_drop(home.drops, "fac", "d1", {"scan.dcm": a}, manifest=False)
    path = Path(home.drops.root) / "fac" / "d1" / "scan.dcm"
    calls: list[int] = []

    def restart_upload() -> None:
        calls.append(1)
        if len(calls) == 2:  # the two-pass batch: A was hashed and parsed
            path.write_bytes(a[: 2 * 1024 * 1024])

    ingest_mod.FAULTS["after_parse"] = restart_upload
    try:
        first = ingest(home)
    finally:
        ingest_mod.FAULTS.pop("after_parse")
    assert dict(first.quarantined) == {} and first.sources_changed == 1
    assert first.rejected == {} and images_left(home) == ["fac/d1/scan.dcm"]
    path.write_bytes(a)
    assert dict(ingest(home).quarantined) == {"uid_conflict": 1}
    qid = one(home, "SELECT quarantine_id FROM quarantine")
    quarantine_export(home, str(qid), tmp_path / "q.dcm")
    assert (tmp_path / "q.dcm").read_bytes() == a
    assert images_left(home) == []


@pytest.mark.parametrize("how", ["removed", "symlink", "fifo"])
def test_a_large_file_gone_before_its_quarantine_copy_fails_alone(
    local_home: Home, tmp_path: Path, how: str
) -> None:
    """A large file bound for quarantine (its header rejected) is removed, or replaced by a
    symlink or a FIFO, before its copy is written: the rest of the batch (a duplicate, a
    new study) is handled, and the file is not counted quarantined."""
    home = local_home
    dup = big_image(61)
    samples.write_drop(home.drops, "fac", "d0", {"x.dcm": dup}, manifest=False)
    assert ingest(home).ingested == 1
    junk = b"NOT DICOM " * (IN_MEMORY_MAX // 10 + 10)
    files = {**small_study(62), PHI_NAME: junk, "dup.dcm": dup}
    samples.write_drop(home.drops, "fac", PHI_FOLDER, files, manifest=False)
    path = Path(home.drops.root) / "fac" / PHI_FOLDER / PHI_NAME
    calls: list[int] = []

    def hit() -> None:
        calls.append(1)
        if len(calls) != 2:  # the two-pass batch, after its parse
            return
        path.unlink()
        if how == "fifo":
            os.mkfifo(path)
        elif how == "symlink":
            (tmp_path / "elsewhere").write_bytes(b"x")
            path.symlink_to(tmp_path / "elsewhere")

    ingest_mod.FAULTS["after_parse"] = hit
    try:
        stats = ingest(home)
    finally:
        ingest_mod.FAULTS.pop("after_parse")
    assert stats.ingested == 2 and stats.duplicates == 1
    assert dict(stats.quarantined) == {}
    stored_bytes_match_rows(home)


def test_a_small_file_grown_since_the_listing_is_not_read_whole(local_home: Home) -> None:
    """Read no further than its listed size and a byte: a file listed at 39 kB that grew
    to 40 MB is left for the next listing, not read into memory."""
    home = local_home
    files = small_study(91)
    samples.write_drop(home.drops, "fac", "d1", files, manifest=False)
    work = listed(home)
    path = Path(home.drops.root) / "fac" / "d1" / next(iter(files))
    with path.open("ab") as fh:
        fh.write(b"\0" * (40 * 2**20))
    tracemalloc.start()
    try:
        stats = ingest_batch(home, work, max_file_bytes=20 * 2**20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20
    assert stats.ingested == 1 and stats.sources_changed == 1
    stored_bytes_match_rows(home)
