"""Archives and CDs in drops: each member or CD file is a file of the drop with its own
outcome; an archive past a bound is quarantined whole; nothing is left in plain text
outside the drops, and a run stopped anywhere is finished by the next one exactly once."""

from __future__ import annotations

import hashlib
import io
import json
import random
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
import zlib
from pathlib import Path

import pytest

from dropvault.flows.ingest import ingest_drops
from dropvault.flows.settings import Settings
from dropvault.storage.home import Home
from dropvault.tasks import ingest as ingest_mod
from dropvault.tasks import samples
from dropvault.tasks.archives import _BoundedTarInfo
from dropvault.tasks.receipts import read_receipt
from tests.helpers import cli_env, drop_ref, sources

pytestmark = pytest.mark.integration


def _study(seed: int, n: int = 3) -> tuple[str, dict[str, bytes]]:
    rng = random.Random(seed)
    return samples.make_study(rng, samples.make_patient(rng, seed), n, "CT_small.dcm")


def _settings(**kw: object) -> Settings:
    return Settings.load(quiet_seconds=0, **kw)


def _reasons(home: Home) -> dict[str, int]:
    rows = home.catalog.query("SELECT reason, count(*) AS n FROM quarantine GROUP BY 1")
    return dict(zip(rows["reason"], rows["n"], strict=True))


def _count(home: Home, sql: str) -> int:
    return int(home.catalog.query(sql).iloc[0, 0])


def _plain_outside_drops(root: Path, needles: list[bytes]) -> list[str]:
    """Files of a local home, outside its drops, that hold any of ``needles`` in clear."""
    drops = root / "drops"
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and drops not in p.parents:
            data = p.read_bytes()
            if any(n in data for n in needles):
                hits.append(str(p.relative_to(root)))
    return hits


def test_a_zip_and_tarballs_are_ingested_member_by_member(home: Home) -> None:
    """On file://, memory:// and moto's S3: each member gets its own outcome, the receipt
    names members by their path in the archive, and the drop is gone afterwards."""
    _, a = _study(1)
    _, b = _study(2)
    _, c = _study(3)
    bad = {"notes.txt": samples.not_dicom(), "cut.dcm": samples.truncated(next(iter(a.values())))}
    drop = {
        "export.zip": samples.zip_bytes({**a, **bad}),
        "script.tar.gz": samples.tar_bytes({f"./{k}": v for k, v in b.items()}),
        "plain.tar": samples.tar_bytes(c, gz=False),
    }
    samples.write_drop(home.drops, "fac", "d1", drop)
    stats = ingest_drops(home=home, settings=_settings())
    assert (stats.ingested, stats.duplicates) == (9, 0)
    assert _reasons(home) == {"not_dicom": 1, "truncated": 1}
    assert _count(home, "SELECT count(DISTINCT sop_instance_uid) FROM instances") == 9
    r = read_receipt(home.drops, "fac", drop_ref(home, "fac", "d1"))
    assert r["state"] == "done" and r["ingested"] == 9
    assert r["unpacked"] == ["export.zip", "plain.tar", "script.tar.gz"]
    assert r["quarantined_files"] == {
        "not_dicom": ["export.zip.contents/notes.txt"],
        "truncated": ["export.zip.contents/cut.dcm"],
    }
    assert sources(home.drops) == []
    again = ingest_drops(home=home, settings=_settings())
    assert again.files_seen == 0


def test_zip_slip_names_are_refused_and_nothing_lands_outside_the_drop(
    local_home: Home, tmp_path: Path
) -> None:
    home = local_home
    _, good = _study(4, 1)
    image = next(iter(good.values()))
    evil = {
        "../../escaped.dcm": image,
        "/abs/escaped.dcm": image,
        "C:/escaped.dcm": image,
        "dir\\..\\..\\escaped.dcm": image,
        "ok/../../../escaped.dcm": image,
    }
    samples.write_drop(home.drops, "fac", "d1", {"x.zip": samples.zip_bytes({**good, **evil})})
    stats = ingest_drops(home=home, settings=_settings())
    assert stats.ingested == 1
    assert _reasons(home) == {"unsafe_name": 5}
    # No row kept bytes of a refused member, and nothing was written where they pointed.
    assert _count(home, "SELECT count(*) FROM quarantine WHERE object_id <> ''") == 0
    assert not any(p.name == "escaped.dcm" for p in tmp_path.rglob("*"))
    assert not (Path("/abs/escaped.dcm")).exists()
    assert sources(home.drops) == []


@pytest.mark.parametrize("kind", ["zip", "tgz"])
def test_a_bomb_is_quarantined_whole_by_ratio_and_by_total(local_home: Home, kind: str) -> None:
    home = local_home
    _, good = _study(5, 1)
    zeros = {"pad.bin": bytes(8 << 20), **good}  # 8 MiB of zeros: ratio ~1000
    pack = samples.zip_bytes if kind == "zip" else samples.tar_bytes
    big = {f"r{i}.bin": random.Random(i).randbytes(400_000) for i in range(4)}
    samples.write_drop(home.drops, "fac", "ratio", {f"bomb.{kind}": pack(zeros)})
    samples.write_drop(home.drops, "fac", "total", {f"big.{kind}": pack({**good, **big})})
    limits = {"archive_max_bytes": 1_500_000, "archive_max_ratio": 50}
    stats = ingest_drops(home=home, settings=_settings(**limits))
    assert stats.ingested == 0
    assert _reasons(home) == {"archive_too_large": 2}
    rows = home.catalog.query("SELECT size_bytes, detail, object_id FROM quarantine")
    assert all(rows["object_id"] != "")  # the archives themselves, kept encrypted
    assert any("ratio" in d for d in rows["detail"]) and any("bytes" in d for d in rows["detail"])
    assert sources(home.drops) == []  # members written before the bound showed are gone


def test_too_many_members_and_nesting_past_the_limit(local_home: Home) -> None:
    home = local_home
    _, a = _study(6, 4)
    _, b = _study(7, 1)
    deepest = samples.zip_bytes(b)
    inner = samples.zip_bytes({"deeper.zip": deepest, **dict(list(a.items())[:1])})
    outer = samples.zip_bytes({"inner.zip": inner})
    samples.write_drop(home.drops, "fac", "nested", {"outer.zip": outer})
    samples.write_drop(home.drops, "fac", "many", {"many.zip": samples.zip_bytes(a)})
    ingest_drops(home=home, settings=_settings(archive_max_members=3))
    # outer -> inner (one level of nesting) unpacked; deeper.zip is a second level. The
    # members of an archive and of those inside it count together: 1 + 2 here.
    assert _reasons(home) == {"archive_too_deep": 1, "archive_too_large": 1}
    assert _count(home, "SELECT count(*) FROM instances") == 1
    assert sources(home.drops) == []


def test_encrypted_and_truncated_archives_are_quarantined_whole(local_home: Home) -> None:
    home = local_home
    _, a = _study(8, 3)
    whole_zip, whole_tar = samples.zip_bytes(a), samples.tar_bytes(a, gz=False)
    drop = {
        "locked.zip": samples.zip_bytes(a, encrypted_flag=True),
        "cut.zip": whole_zip[: len(whole_zip) * 2 // 3],
        "cut.tar": whole_tar[: len(whole_tar) * 2 // 3],
        "cut.tgz": samples.tar_bytes(a)[:-40],
        "not-really.zip": samples.not_dicom(),
    }
    samples.write_drop(home.drops, "fac", "d1", drop)
    stats = ingest_drops(home=home, settings=_settings())
    assert stats.ingested == 0
    assert _reasons(home) == {"archive_encrypted": 1, "archive_corrupt": 4}
    assert sources(home.drops) == []  # a cut tar's first members were unpacked, then undone


def test_a_tar_with_links_and_devices_refuses_those_members(
    local_home: Home, tmp_path: Path
) -> None:
    home = local_home
    _, a = _study(9, 2)
    links = {"link": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE, "dev": tarfile.CHRTYPE,
             "fifo": tarfile.FIFOTYPE}  # fmt: skip
    samples.write_drop(home.drops, "fac", "d1", {"x.tgz": samples.tar_bytes(a, links=links)})
    stats = ingest_drops(home=home, settings=_settings())
    assert stats.ingested == 2
    assert _reasons(home) == {"archive_member_refused": 4}
    assert not any(p.is_symlink() for p in tmp_path.rglob("*"))
    assert sources(home.drops) == []


KILLED_RUN = """
import os, signal, sys
from dropvault.flows.ingest import ingest_drops
from dropvault.flows.settings import Settings
from dropvault.storage.home import Home
from dropvault.tasks import archives, ingest

home_dir, where = sys.argv[1], sys.argv[2]
calls = []
def kill():
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
(archives.FAULTS if where == "mid_unpack" else ingest.FAULTS)[
    "after_member" if where == "mid_unpack" else "after_commit"] = kill
settings = Settings.load(home=home_dir, quiet_seconds=0, batch_files=2, batches_in_flight=1)
ingest_drops(home=Home.init(home_dir), settings=settings)
print("not killed")
"""


@pytest.mark.parametrize("where", ["mid_unpack", "between_batches"])
def test_a_run_killed_mid_archive_is_finished_exactly_once(tmp_path: Path, where: str) -> None:
    """SIGKILL while the archive unpacks, or after the second of four batches committed:
    the archive stays, and the next run catalogs every member exactly once."""
    home_dir = tmp_path / "home"
    home = Home.init(home_dir)
    patient = samples.make_patient(random.Random(10), 10)
    _, a = samples.make_study(random.Random(10), patient, 7, "CT_small.dcm")
    files = {"a-note.txt": b"not an image", **a}
    samples.write_drop(home.drops, "fac", "d1", {"x.zip": samples.zip_bytes(files)})
    proc = subprocess.run(  # noqa: S603 - this interpreter
        [sys.executable, "-c", KILLED_RUN, str(home_dir), where],
        env=cli_env(home_dir),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert any(e.name.endswith("/x.zip") for e in sources(home.drops))  # the archive stays
    ingest_drops(home=home, settings=_settings(batch_files=2, batches_in_flight=1))
    assert _count(home, "SELECT count(*) FROM instances") == 7
    assert _count(home, "SELECT count(DISTINCT sop_instance_uid) FROM instances") == 7
    assert _reasons(home) == {"not_dicom": 1}
    assert sources(home.drops) == []
    secret = [patient.name.encode(), patient.patient_id.encode()]
    assert _plain_outside_drops(home_dir, secret) == []


def test_a_manifest_may_list_an_archive_and_its_checksum_is_checked(local_home: Home) -> None:
    home = local_home
    _, a = _study(11, 2)
    packed = samples.zip_bytes(a)
    samples.write_drop(home.drops, "fac", "good", {"a.zip": packed})
    samples.write_drop(home.drops, "fac", "bad", {"a.zip": packed}, listed={"a.zip": packed + b"x"})
    # The listed size differs too: make the bad one's listed size match, checksum not.
    doc = json.loads(home.drops.read_bytes("fac/bad/manifest.json"))
    doc["files"][0]["size"] = len(packed)
    home.drops.put_bytes("fac/bad/manifest.json", json.dumps(doc).encode())
    stats = ingest_drops(home=home, settings=_settings())
    assert stats.ingested == 2
    assert _reasons(home) == {"checksum_mismatch": 1}
    assert hashlib.sha256(packed).hexdigest() != doc["files"][0]["sha256"]
    assert sources(home.drops) == []


# -- CDs ----------------------------------------------------------------------


def test_a_cd_is_read_by_its_dicomdir_with_extras_kept_apart(
    local_home: Home, tmp_path: Path
) -> None:
    home = local_home
    cd = samples.cd_files()
    samples.write_drop(home.drops, "fac", "CD 1", cd, manifest=False)
    stats = ingest_drops(home=home, settings=_settings())
    assert stats.ingested == 31
    # The DICOMDIR is the drop's directory, not a bad image; the rest is the CD's extras.
    assert _reasons(home) == {"cd_extra": 3}
    r = read_receipt(home.drops, "fac", drop_ref(home, "fac", "CD 1"))
    assert sorted(r["quarantined_files"]["cd_extra"]) == [
        "README.txt",
        "autorun.inf",
        "viewer/viewer.exe",
    ]
    assert r["state"] == "done" and r["directory_references"] == 31
    assert sources(home.drops) == []
    names = [b"ANON", b"ANON^^"]  # the CD's patient, in clear only inside the drops
    assert _plain_outside_drops(tmp_path, [n for n in names if n in cd["DICOMDIR"]]) == []


def test_a_cd_can_discard_its_extras_after_counting(local_home: Home) -> None:
    home = local_home
    samples.write_drop(home.drops, "fac", "cd", samples.cd_files(), manifest=False)
    stats = ingest_drops(home=home, settings=_settings(cd_extras="discard"))
    assert (stats.ingested, stats.discarded) == (31, 3)
    assert _reasons(home) == {}
    r = read_receipt(home.drops, "fac", drop_ref(home, "fac", "cd"))
    assert sorted(r["quarantined_files"]["discarded"]) == [
        "README.txt",
        "autorun.inf",
        "viewer/viewer.exe",
    ]
    assert sources(home.drops) == []


def test_a_cd_missing_a_referenced_file_waits_then_goes_incomplete(local_home: Home) -> None:
    home = local_home
    cd = samples.cd_files()
    gone = "98892001/CT2N/6293"
    assert gone in cd
    del cd[gone]
    samples.write_drop(home.drops, "fac", "cd", cd, manifest=False)
    stats = ingest_drops(home=home, settings=_settings(incomplete_seconds=3600))
    assert stats.files_seen == 0 and stats.drops_waiting == 1
    r = read_receipt(home.drops, "fac", drop_ref(home, "fac", "cd"))
    assert r["state"] == "waiting" and r["missing"] == [gone.upper()]
    assert "DICOMDIR" in r["why"]
    stats = ingest_drops(home=home, settings=_settings(incomplete_seconds=0.001))
    assert stats.ingested == 0
    assert _reasons(home) == {"incomplete_drop": 33}  # 30 images and 3 extras
    assert sources(home.drops) == []


def test_a_cd_file_whose_uid_is_not_its_record_is_quarantined(local_home: Home) -> None:
    home = local_home
    cd = samples.cd_files()
    first, second = "98892001/CT2N/6293", "98892001/CT2N/6924"
    cd[first] = cd[second]  # the same image under two records: one of them lies
    samples.write_drop(home.drops, "fac", "cd", cd, manifest=False)
    stats = ingest_drops(home=home, settings=_settings())
    assert stats.ingested == 30
    assert _reasons(home) == {"dicomdir_mismatch": 1, "cd_extra": 3}


def test_a_cd_inside_a_zip(local_home: Home) -> None:
    """A CD sent zipped: unpacked, then read by its DICOMDIR like a CD copied as files."""
    home = local_home
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in samples.cd_files().items():
            zf.writestr(f"CD/{name}", data)
    samples.write_drop(home.drops, "fac", "d1", {"cd.zip": buf.getvalue()})
    stats = ingest_drops(home=home, settings=_settings())
    assert stats.ingested == 31
    assert _reasons(home) == {"cd_extra": 3}
    assert sources(home.drops) == []


# -- what an outside review broke ---------------------------------------------


def _zip_raw(entries: list[tuple[str, bytes, int]]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, data, method in entries:
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=method)
    return out.getvalue()


def test_an_unaccepted_compression_or_a_bad_name_is_corrupt_and_stops_nobody(
    local_home: Home,
) -> None:
    """bzip2 and LZMA members (zipfile inflates them whole before checking sizes), a bzip2
    tar named .tar, and a name flagged UTF-8 that is not: each is archive_corrupt, and the
    other facility's drop is ingested in the same run."""
    home = local_home
    _, a = _study(20, 1)
    _, other = _study(21, 2)
    image = next(iter(a.values()))
    bz2_tar = io.BytesIO()
    with tarfile.open(fileobj=bz2_tar, mode="w:bz2") as tf:
        info = tarfile.TarInfo("x.dcm")
        info.size = len(image)
        tf.addfile(info, io.BytesIO(image))
    bad_name = bytearray(_zip_raw([("n" * 8 + ".dcm", image, zipfile.ZIP_STORED)]))
    for sig, flags_at, name_at in ((b"PK\x03\x04", 6, 30), (b"PK\x01\x02", 8, 46)):
        at = bad_name.find(sig)
        bad_name[at + flags_at] |= 0x08  # bit 11 (UTF-8 names) is in the second byte
        bad_name[at + flags_at + 1] |= 0x08
        bad_name[at + name_at] = 0xFF  # not UTF-8
    drop = {
        "bz.zip": _zip_raw([("x.dcm", image, zipfile.ZIP_BZIP2)]),
        "xz.zip": _zip_raw([("x.dcm", image, zipfile.ZIP_LZMA)]),
        "bz.tar": bz2_tar.getvalue(),
        "name.zip": bytes(bad_name),
    }
    samples.write_drop(home.drops, "fac", "bad", drop)
    samples.write_drop(home.drops, "other", "fine", other)
    stats = ingest_drops(home=home, settings=_settings())
    assert stats.ingested == 2
    assert _reasons(home) == {"archive_corrupt": 4}
    assert sources(home.drops) == []


def test_headers_and_directories_count_against_the_bounds(local_home: Home) -> None:
    home = local_home
    long_header = io.BytesIO()
    with tarfile.open(fileobj=long_header, mode="w:gz", format=tarfile.GNU_FORMAT) as tf:
        info = tarfile.TarInfo("a" * (2 << 20))  # a 2 MiB long-name header, read whole
        tf.addfile(info, io.BytesIO(b""))
    dirs = io.BytesIO()
    with tarfile.open(fileobj=dirs, mode="w:gz") as tf:
        for i in range(300):
            d = tarfile.TarInfo(f"d{i}")
            d.type = tarfile.DIRTYPE
            tf.addfile(d)
    samples.write_drop(home.drops, "fac", "d1", {"long.tgz": long_header.getvalue(),
                                                 "dirs.tgz": dirs.getvalue()})  # fmt: skip
    ingest_drops(home=home, settings=_settings(archive_max_members=100))
    assert _reasons(home) == {"archive_corrupt": 1, "archive_too_large": 1}
    assert sources(home.drops) == []


def test_nesting_shares_one_budget(local_home: Home) -> None:
    """Each inner archive alone is under the ratio; together they are a bomb."""
    home = local_home
    inner = samples.zip_bytes({"z.bin": bytes(600_000)})
    outer = _zip_raw([(f"i{k}.zip", inner, zipfile.ZIP_STORED) for k in range(20)])
    samples.write_drop(home.drops, "fac", "d1", {"outer.zip": outer})
    ingest_drops(home=home, settings=_settings(archive_max_ratio=50))
    assert _reasons(home) == {"archive_too_large": 1}
    assert sources(home.drops) == []


def test_member_names_that_reach_into_an_unpacking_folder_or_are_too_long(
    local_home: Home,
) -> None:
    home = local_home
    _, a = _study(22, 3)
    one, two, three = a.values()
    packed = _zip_raw([
        ("inner.zip", samples.zip_bytes({"x.dcm": two}), zipfile.ZIP_STORED),
        ("inner.zip.contents/x.dcm", one, zipfile.ZIP_STORED),  # would be overwritten
        ("L" * 300 + ".dcm", one, zipfile.ZIP_STORED),
        ("ok.dcm", three, zipfile.ZIP_STORED),
        ("../up.dcm", one, zipfile.ZIP_STORED),
        ("outer.zip#member-4", one, zipfile.ZIP_STORED),  # like a refused member's label
    ])  # fmt: skip
    samples.write_drop(home.drops, "fac", "d1", {"outer.zip": packed})
    stats = ingest_drops(home=home, settings=_settings())
    # two (from inner.zip), three, and one once (the member named like a refused member's
    # label is an ordinary member); one's other three names are refused.
    assert _count(home, "SELECT count(*) FROM instances") == 3
    assert _reasons(home) == {"unsafe_name": 3}
    assert stats.duplicates == 0
    r = read_receipt(home.drops, "fac", drop_ref(home, "fac", "d1"))
    assert r["state"] == "done"
    assert sources(home.drops) == []


def test_a_member_over_the_file_limit_refuses_its_archive_once(local_home: Home) -> None:
    home = local_home
    samples.write_drop(
        home.drops, "fac", "d1", {"x.zip": samples.zip_bytes({"big": bytes(300_000)})}
    )
    for _ in range(3):
        ingest_drops(home=home, settings=_settings(max_file_bytes=200_000))
    assert _reasons(home) == {"archive_too_large": 1}
    assert sources(home.drops) == []


def test_a_killed_writers_partial_file_does_not_hold_the_drop(local_home: Home) -> None:
    home = local_home
    _, a = _study(23, 2)
    samples.write_drop(home.drops, "fac", "d1", {"x.zip": samples.zip_bytes(a)})
    home.drops.put_bytes("fac/d1/x.zip.contents/.tmp-0123abcd", b"partial plain text")
    ingest_drops(home=home, settings=_settings())
    assert _count(home, "SELECT count(*) FROM instances") == 2
    assert sources(home.drops) == []


def test_a_cd_folder_name_reused_still_waits_for_every_image(local_home: Home) -> None:
    home = local_home
    _, first = _study(24, 1)
    samples.write_drop(home.drops, "fac", "cd-0001", first, manifest=False)
    ingest_drops(home=home, settings=_settings())
    cd = samples.cd_files()
    del cd["98892001/CT2N/6293"]
    samples.write_drop(home.drops, "fac", "cd-0001", cd, manifest=False)
    stats = ingest_drops(home=home, settings=_settings(incomplete_seconds=3600))
    assert stats.drops_waiting == 1 and stats.ingested == 0


def test_a_future_dated_dicomdir_neither_postpones_nor_ends_the_wait(local_home: Home) -> None:
    import os
    import time

    home = local_home
    cd = samples.cd_files()
    del cd["98892001/CT2N/6293"]
    samples.write_drop(home.drops, "fac", "cd", cd, manifest=False)
    root = Path(home.drops.path("fac/cd"))
    ahead = time.time() + 10 * 365 * 86400
    os.utime(root / "DICOMDIR", (ahead, ahead))
    # The files arrived just now: the window starts with them, not at the epoch.
    stats = ingest_drops(home=home, settings=_settings(incomplete_seconds=3600))
    assert stats.drops_waiting == 1 and _reasons(home) == {}
    # Files two hours old: a one-hour window is over, ten years ahead or not.
    old = time.time() - 7200
    for p in root.rglob("*"):
        if p.is_file() and p.name != "DICOMDIR":
            os.utime(p, (old, old))
    ingest_drops(home=home, settings=_settings(incomplete_seconds=3600))
    assert _reasons(home) == {"incomplete_drop": 33}


def test_a_facilitys_files_beside_and_inside_the_unpacking_folder_keep_their_outcome(
    local_home: Home,
) -> None:
    home = local_home
    _, a = _study(25, 4)
    one, two, three, four = a.values()
    packed = _zip_raw([("../evil.dcm", one, zipfile.ZIP_STORED), ("ok.dcm", two, 0)])
    samples.write_drop(home.drops, "fac", "good", {
        "x.zip": packed,
        "x.zip.contents/mine.dcm": three,  # the facility's own, in our folder
        "x.zip#refused-member-0": four,  # named like the refused member's label
    })  # fmt: skip
    samples.write_drop(home.drops, "fac", "bad", {
        "y.zip": b"PK\x03\x04 not really",
        "y.zip.contents/mine.dcm": one,
    })  # fmt: skip
    ingest_drops(home=home, settings=_settings())
    assert _count(home, "SELECT count(*) FROM instances") == 4
    assert _reasons(home) == {"unsafe_name": 1, "archive_corrupt": 1}
    for folder in ("good", "bad"):
        r = read_receipt(home.drops, "fac", drop_ref(home, "fac", folder))
        assert r["state"] == "done", (folder, r)
    assert sources(home.drops) == []


def test_sparse_headers_unknown_types_and_a_lying_zip_directory(local_home: Home) -> None:
    home = local_home
    _, a = _study(26, 2)
    one, two = a.values()
    sparse = io.BytesIO()
    with tarfile.open(fileobj=sparse, mode="w:gz", format=tarfile.GNU_FORMAT) as tf:
        info = tarfile.TarInfo("s.dcm")
        info.type = tarfile.GNUTYPE_SPARSE
        tf.addfile(info)
    odd = io.BytesIO()
    with tarfile.open(fileobj=odd, mode="w") as tf:
        info = tarfile.TarInfo("z.dcm")
        info.type = b"Z"  # unknown to tar: a regular file
        info.size = len(one)
        tf.addfile(info, io.BytesIO(one))
    many = _zip_raw([("n" * 250 + f"{i:05d}", b"", zipfile.ZIP_STORED) for i in range(2000)])
    samples.write_drop(home.drops, "fac", "d1", {"sparse.tgz": sparse.getvalue(),
        "odd.tar": odd.getvalue(), "many.zip": many, "beside.dcm": two})  # fmt: skip
    ingest_drops(home=home, settings=_settings(archive_max_members=1000))
    assert _count(home, "SELECT count(*) FROM instances") == 2
    assert _reasons(home) == {"archive_corrupt": 1, "archive_too_large": 1}
    assert sources(home.drops) == []


def test_tar_bookkeeping_entries_are_not_files(local_home: Home) -> None:
    """A Solaris ACL entry ('A') comes before the file it describes, under its name; GNU
    dump directories ('D') and volume labels ('V') are tar's own: none is a file."""
    home = local_home
    _, a = _study(27, 1)
    image = next(iter(a.values()))
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tf:
        entries = [
            ("vol", b"V", b""),
            ("dir", b"D", b"Ydir\0"),
            ("IM0.dcm", b"A", b"user::rw-\0"),
            ("IM0.dcm", tarfile.REGTYPE, image),
        ]
        for name, kind, data in entries:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    samples.write_drop(home.drops, "fac", "d1", {"x.tar": out.getvalue()})
    stats = ingest_drops(home=home, settings=_settings())
    assert stats.ingested == 1 and _reasons(home) == {}
    assert sources(home.drops) == []


def test_strong_encryption_and_patched_data_flags_are_refused_whole(local_home: Home) -> None:
    home = local_home
    _, a = _study(28, 1)
    raw = samples.zip_bytes(a)

    def flagged(bit: int) -> bytes:
        buf = bytearray(raw)
        for sig, at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
            pos = buf.find(sig)
            buf[pos + at] |= bit
        return bytes(buf)

    samples.write_drop(home.drops, "fac", "d1", {"strong.zip": flagged(0x40),
                                                 "patched.zip": flagged(0x20)})  # fmt: skip
    stats = ingest_drops(home=home, settings=_settings())
    assert stats.ingested == 0
    assert _reasons(home) == {"archive_encrypted": 1, "archive_corrupt": 1}
    assert sources(home.drops) == []


def test_an_archive_re_sent_under_its_name_after_the_unpack_is_not_removed(
    local_home: Home,
) -> None:
    """The facility sends its next study as ``study.zip`` again while the first one's
    members are ingested: the drop is not finished over it, and the next run takes it."""
    home = local_home
    rng = random.Random(402)
    _, first = samples.make_study(rng, samples.make_patient(rng, 1), 2, "CT_small.dcm")
    _, second = samples.make_study(rng, samples.make_patient(rng, 2), 2, "CT_small.dcm")
    zipped = {"study.zip": samples.zip_bytes(first)}
    samples.write_drop(home.drops, "fac", "d1", zipped, manifest=False)
    path = Path(home.drops.root) / "fac" / "d1" / "study.zip"
    sent: list[int] = []

    def resend() -> None:
        if not sent:
            sent.append(1)
            path.write_bytes(samples.zip_bytes(second))

    ingest_mod.FAULTS["after_commit"] = resend
    try:
        ingest_drops(home=home, settings=Settings.load(quiet_seconds=0))
    finally:
        ingest_mod.FAULTS.pop("after_commit")
    assert path.exists()
    ingest_drops(home=home, settings=Settings.load(quiet_seconds=0))
    shas = set(home.catalog.query("SELECT sha256 FROM instances")["sha256"])
    assert {hashlib.sha256(d).hexdigest() for d in [*first.values(), *second.values()]} <= shas


def _tgz_of_zeros(name: str, kind: bytes, mib: int) -> bytes:
    """A gzipped tar holding one member of ``mib`` MiB of zeros (~1 KB a MiB packed)."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = mib << 20
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [packer.compress(info.tobuf(format=tarfile.GNU_FORMAT))]
    parts += [packer.compress(b"\0" * (1 << 20)) for _ in range(mib)]
    return b"".join([*parts, packer.compress(b"\0" * 1024), packer.flush()])


@pytest.mark.parametrize(
    ("name", "kind"),
    [("../escape.dcm", tarfile.REGTYPE), ("acl", b"A"), ("label", b"V")],
    ids=["refused name", "ACL entry", "volume label"],
)
def test_a_skipped_member_still_counts_against_the_ratio(
    local_home: Home, name: str, kind: bytes
) -> None:
    """tarfile inflates a member's data to skip it: a bomb under a refused name or a
    bookkeeping typeflag is still a bomb (one of 64 MiB once cost 6 s a 255 KB archive,
    outside every bound)."""
    home = local_home
    _, good = _study(31, 1)
    samples.write_drop(home.drops, "fac", "d1", {"x.tgz": _tgz_of_zeros(name, kind, 64)})
    samples.write_drop(home.drops, "other", "d1", good)
    started = time.process_time()
    stats = ingest_drops(home=home, settings=_settings())
    assert _reasons(home) == {"archive_too_large": 1}
    assert stats.ingested == 1
    assert time.process_time() - started < 30  # the 64 MiB is never inflated


@pytest.mark.parametrize(
    "records",
    [b"1" * 65536, b"4 ab" * 20_000 + b"=\n", b"0 " * 100, b"9 path=a\n" + b"x" * 100],
    ids=["a run of digits", "records before one far '='", "zero lengths", "trailing bytes"],
)
def test_a_malformed_pax_header_is_corrupt_at_once(local_home: Home, records: bytes) -> None:
    """Python 3.11.7's pax parser is quadratic on some headers (CVE-2024-6232): a 64 KB one
    cost 6 s, and every member may carry one. Records are checked first, in one pass."""
    home = local_home
    header = tarfile.TarInfo("././@PaxHeader")
    header.type = tarfile.XHDTYPE
    header.size = len(records)
    member = tarfile.TarInfo("a.dcm")
    body = header.tobuf(format=tarfile.USTAR_FORMAT) + records + b"\0" * (-len(records) % 512)
    raw = body + member.tobuf(format=tarfile.USTAR_FORMAT) + b"\0" * 1024
    samples.write_drop(home.drops, "fac", "d1", {"x.tar": raw})
    started = time.process_time()
    with (
        pytest.raises(tarfile.HeaderError),
        tarfile.open(fileobj=io.BytesIO(raw), mode="r|", tarinfo=_BoundedTarInfo) as tf,
    ):
        list(tf)
    assert time.process_time() - started < 0.5
    ingest_drops(home=home, settings=_settings())
    assert _reasons(home) == {"archive_corrupt": 1}


def test_a_pax_header_with_long_names_and_times_is_read() -> None:
    """The record check accepts what tar writes: a long path, times, a user name."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("deep/" * 40 + "IM0.dcm")
        info.size, info.mtime, info.uname = 3, 1_700_000_000.123456, "émilie"
        info.pax_headers = {"comment": "a = b\nc"}
        tf.addfile(info, io.BytesIO(b"abc"))
    with tarfile.open(fileobj=io.BytesIO(out.getvalue()), mode="r|", tarinfo=_BoundedTarInfo) as tf:
        names = [(m.name, m.uname, m.pax_headers.get("comment")) for m in tf]
    assert names == [("deep/" * 40 + "IM0.dcm", "émilie", "a = b\nc")]


def test_a_zip_of_long_extra_fields_is_corrupt_before_zipfile_reads_it(local_home: Home) -> None:
    """Python 3.11.7's zipfile re-slices an entry's extra field for every record in it:
    450 fields of 65,532 bytes of empty records cost 8.6 s to open a 59 MB ZIP (and 10 s
    wrapped in a 437 KB .tgz, under the ratio). Such a ZIP is refused unread."""
    home = local_home
    _, good = _study(41, 1)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for i in range(40):
            info = zipfile.ZipInfo(f"IM{i}.dcm")
            info.extra = b"\xfe\xca\x00\x00" * (65_532 // 4)  # empty records, id 0xcafe
            zf.writestr(info, b"")
    samples.write_drop(home.drops, "fac", "d1", {"x.zip": out.getvalue()})
    samples.write_drop(home.drops, "other", "d1", good)
    started = time.process_time()
    stats = ingest_drops(home=home, settings=_settings())
    assert _reasons(home) == {"archive_corrupt": 1}
    assert stats.ingested == 1
    assert time.process_time() - started < 30


def test_a_gzip_header_with_a_long_name_is_corrupt_at_once(local_home: Home) -> None:
    """tarfile reads a gzip header's file name a byte a call (64 MiB with no NUL took
    29 s before the archive was found corrupt): past 4 KiB it is refused unread."""
    home = local_home
    header = b"\x1f\x8b\x08" + bytes([8]) + b"\0" * 6  # FNAME set
    samples.write_drop(home.drops, "fac", "d1", {"x.tgz": header + b"a" * (1 << 20)})
    started = time.process_time()
    ingest_drops(home=home, settings=_settings())
    assert _reasons(home) == {"archive_corrupt": 1}
    assert time.process_time() - started < 30
