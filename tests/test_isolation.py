"""No input stops the pipeline: each file, manifest row and beacon line fails on its own.

Each test puts one hostile input beside good ones, as a facility, an owner's portal or a
web server would, and checks that the good ones apply, the bad one is recorded with a
reason, and a second run is not blocked by it.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import time
from pathlib import Path

import pytest

from dropvault.flows.beacons import compile_beacon_stats
from dropvault.flows.deletion import deletion_sweep
from dropvault.flows.ingest import ingest_drops
from dropvault.flows.settings import Settings
from dropvault.flows.sharing import apply_share_manifests
from dropvault.storage.home import Home
from dropvault.tasks import samples
from dropvault.tasks.drops import scan_drops
from dropvault.tasks.ingest import ingest_batch
from tests.helpers import seed, sources, ts, write_manifest

QUIET = Settings(quiet_seconds=0)


def good_drop(home: Home, rng: random.Random, facility: str, drop: str, n: int = 2) -> str:
    uid, files = samples.make_study(rng, samples.make_patient(rng, 1), n, "CT_small.dcm")
    samples.write_drop(home.drops, facility, drop, files, manifest=False)
    return uid


def instances(home: Home) -> int:
    return int(home.catalog.query("SELECT count(*) AS n FROM instances")["n"][0])


def reasons(home: Home) -> list[str]:
    return list(home.catalog.query("SELECT reason FROM quarantine ORDER BY reason")["reason"])


def test_a_file_name_that_is_not_utf8_is_quarantined_and_the_rest_ingest(
    local_home: Home, rng: random.Random
) -> None:
    good_drop(local_home, rng, "fac-a", "d1")
    good_drop(local_home, rng, "fac-b", "d2")
    folder = Path(local_home.drops.path("fac-a", "d1")).as_posix().encode()
    Path(os.fsdecode(folder + b"/caf\xe9.dcm")).write_bytes(samples.not_dicom())
    stats = ingest_drops(home=local_home, settings=QUIET)
    assert stats.ingested == 4 and instances(local_home) == 4
    assert reasons(local_home) == ["unsafe_name"]
    again = ingest_drops(home=local_home, settings=QUIET)
    assert again.ingested == 0 and reasons(local_home) == ["unsafe_name"]


def test_a_drop_folder_name_that_is_not_utf8_does_not_stop_other_drops(
    local_home: Home, rng: random.Random
) -> None:
    good_drop(local_home, rng, "fac-a", "d1")
    bad = Path(os.fsdecode(Path(local_home.drops.path("fac-a")).as_posix().encode() + b"/\xff"))
    bad.mkdir()
    (bad / "x.dcm").write_bytes(samples.not_dicom())
    stats = ingest_drops(home=local_home, settings=QUIET)
    assert stats.ingested == 2
    assert "unsafe_name" in reasons(local_home)
    assert ingest_drops(home=local_home, settings=QUIET).ingested == 0


def test_symlinks_in_a_drop_are_reported_never_followed(
    local_home: Home, rng: random.Random, tmp_path: Path
) -> None:
    good_drop(local_home, rng, "fac-a", "d1")
    secret = tmp_path / "elsewhere.dcm"
    secret.write_bytes(samples.not_dicom())
    empty = tmp_path / "empty"
    empty.mkdir()
    folder = Path(local_home.drops.path("fac-a", "d1"))
    (folder / "link.dcm").symlink_to(secret)
    (folder / "series").symlink_to(empty)
    stats = ingest_drops(home=local_home, settings=QUIET)
    assert stats.ingested == 2
    assert reasons(local_home) == ["unreadable", "unreadable"]
    assert secret.exists() and (folder / "link.dcm").is_symlink()  # nothing lost, nothing followed
    status = local_home.catalog.query("SELECT status FROM drops")["status"].tolist()
    assert status == ["partial"]
    # The next run neither fails nor counts them again.
    again = ingest_drops(home=local_home, settings=QUIET)
    assert again.quarantined == {} or sum(again.quarantined.values()) == 0
    assert reasons(local_home) == ["unreadable", "unreadable"]


def test_a_file_swapped_for_a_symlink_after_listing_is_refused(
    local_home: Home, rng: random.Random
) -> None:
    _, theirs = samples.make_study(rng, samples.make_patient(rng, 2), 1, "MR_small.dcm")
    samples.write_drop(local_home.drops, "fac-b", "d9", theirs, manifest=False)
    good_drop(local_home, rng, "fac-a", "d1")
    local_home.catalog.migrate()
    [drop] = [
        d
        for d in scan_drops(local_home.drops, local_home.pepper, 10**10, 0, 86400)
        if d.facility_id == "fac-a"
    ]
    victim = Path(local_home.drops.path(drop.files[0].name))
    victim.unlink()
    victim.symlink_to(Path(local_home.drops.path("fac-b", "d9", next(iter(theirs)))))
    stats = ingest_batch(local_home, [(drop, f) for f in drop.files], max_file_bytes=10**9)
    assert stats.ingested == 1
    assert reasons(local_home) == ["unreadable"]
    facilities = local_home.catalog.query("SELECT DISTINCT facility_id FROM instances")
    assert facilities["facility_id"].tolist() == ["fac-a"]


def test_folders_nested_past_the_path_limit_are_reported(
    local_home: Home, rng: random.Random
) -> None:
    good_drop(local_home, rng, "fac-a", "d1")
    fd = os.open(local_home.drops.path("fac-a", "d1"), os.O_RDONLY)
    try:
        for _ in range(40):  # 40 x 120 characters: past PATH_MAX (4096)
            os.mkdir("n" * 120, dir_fd=fd)
            inner = os.open("n" * 120, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
        leaf = os.open("deep.dcm", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd)
        os.write(leaf, samples.not_dicom())
        os.close(leaf)
    finally:
        os.close(fd)
    stats = ingest_drops(home=local_home, settings=QUIET)
    assert stats.ingested == 2
    assert reasons(local_home) == ["unreadable"]


@pytest.mark.parametrize(
    "when", ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+01:00", "1e400", "2026-13-01"]
)
def test_a_share_row_with_an_impossible_date_is_rejected_and_the_rest_apply(
    local_home: Home, rng: random.Random, when: str
) -> None:
    [uid] = seed(local_home, {"user:alice": 1}, rng)["user:alice"]
    row = {"owner": "user:alice", "study_uid": uid, "action": "share"}
    write_manifest(
        local_home,
        "m.jsonl",
        [
            {**row, "request_id": "bad", "grantee": "user:bob", "requested_at": when},
            {**row, "request_id": "good", "grantee": "user:carol", "requested_at": ts(-1)},
        ],
    )
    apply_share_manifests(home=local_home)
    grants = local_home.catalog.query("SELECT grantee FROM grants")["grantee"].tolist()
    assert grants == ["user:carol"]
    names = [e.name for e in local_home.manifests.list("shares")]
    assert names == ["shares/processed/m.jsonl", "shares/processed/m.jsonl.results.jsonl"]
    results = local_home.manifests.read_bytes("shares/processed/m.jsonl.results.jsonl")
    outcomes = [json.loads(line)["outcome"] for line in results.decode().splitlines()]
    assert outcomes == ["rejected:bad_timestamp", "applied"]


def test_a_deletion_row_with_an_impossible_date_does_not_stop_the_sweep(
    local_home: Home, rng: random.Random
) -> None:
    uids = seed(local_home, {"user:alice": 2}, rng)["user:alice"]
    rows = [
        {"request_id": "r1", "owner": "user:alice", "study_uid": uids[0], "requested_at": ts(-0.1)},
        {
            "request_id": "r2",
            "owner": "user:alice",
            "study_uid": uids[1],
            "requested_at": "0001-01-01T00:00:00+01:00",
        },
    ]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    local_home.manifests.put_bytes("deletions/d.jsonl", text.encode())
    deletion_sweep(home=local_home)
    left = local_home.catalog.query("SELECT study_uid FROM studies WHERE status = 'active'")
    assert left["study_uid"].tolist() == [uids[1]]
    status = local_home.catalog.query("SELECT status FROM deletion_requests ORDER BY line")
    assert status["status"].tolist()[1] == "rejected"


def test_a_manifest_that_is_a_symlink_is_rejected_unread_and_the_rest_apply(
    local_home: Home, rng: random.Random, tmp_path: Path
) -> None:
    [uid] = seed(local_home, {"user:alice": 1}, rng)["user:alice"]
    row = {"request_id": "r1", "owner": "user:alice", "study_uid": uid, "requested_at": ts(-0.1)}
    local_home.manifests.put_bytes("deletions/a.jsonl", (json.dumps(row) + "\n").encode())
    elsewhere = tmp_path / "secret.jsonl"
    elsewhere.write_text(json.dumps({**row, "request_id": "SECRET-ROW"}) + "\n")
    Path(local_home.manifests.path("deletions")).joinpath("b.jsonl").symlink_to(elsewhere)
    deletion_sweep(home=local_home)
    done = local_home.catalog.query("SELECT request_id, status FROM deletion_requests")
    assert sorted(done.itertuples(index=False, name=None)) == [
        ("deletions/b.jsonl#0", "rejected"),
        ("r1", "completed"),
    ]
    results = local_home.manifests.read_bytes("deletions/processed/b.jsonl.results.jsonl")
    assert json.loads(results)["outcome"] == "rejected:unreadable"
    assert b"SECRET-ROW" not in results and elsewhere.exists()


def test_a_beacon_log_that_cannot_be_read_is_set_aside(local_home: Home) -> None:
    day = "2026-11-23"
    hits = [samples.make_hit(random.Random(i), day) for i in range(30)]
    samples.write_hits(local_home.beacons, day, hits)
    local_home.beacons.put_bytes(f"{day}/b.jsonl.gz", b"\x1f\x8b\x08\x00not gzip at all")
    [stats] = compile_beacon_stats(home=local_home)
    assert stats.malformed == 1 and stats.lines > 0
    rejects = local_home.catalog.query("SELECT file, line FROM beacon_rejects")
    assert rejects.values.tolist() == [["b.jsonl.gz", 0]]
    assert [e.name for e in local_home.beacons.list()] == [f"rejected/{day}/b.jsonl.gz"]


def test_a_beacon_line_that_is_not_utf8_is_rejected_by_line_number(local_home: Home) -> None:
    day = "2026-11-20"
    hits = [samples.make_hit(random.Random(i), day) for i in range(40)]
    lines = [json.dumps(h).encode() for h in hits]
    lines[5] = b'{"beacon": "page_view", "target": "/\xff\xfe", "ip": "198.51.100.23"}'
    lines[9] = b"{broken"
    local_home.beacons.put_bytes(f"{day}/a.jsonl", b"\n".join(lines) + b"\n")
    [stats] = compile_beacon_stats(home=local_home)
    assert stats.malformed == 2
    rejects = local_home.catalog.query("SELECT * FROM beacon_rejects ORDER BY line")
    assert rejects[["file", "line"]].values.tolist() == [["a.jsonl", 6], ["a.jsonl", 10]]
    assert "198.51.100.23" not in rejects.to_string()
    assert compile_beacon_stats(home=local_home) == []  # the day is published, not stuck


def test_a_beacon_csv_line_that_is_not_utf8_is_rejected(local_home: Home) -> None:
    day = "2026-11-21"
    hits = [samples.make_hit(random.Random(i), day) for i in range(30)]
    samples.write_hits(local_home.beacons, day, hits, name="a.csv")
    raw = local_home.beacons.read_bytes(f"{day}/a.csv").split(b"\n")
    raw[3] = raw[3].replace(b"https", b"\xe9ttps", 1)
    local_home.beacons.put_bytes(f"{day}/a.csv", b"\n".join(raw))
    [stats] = compile_beacon_stats(home=local_home)
    assert stats.malformed == 1
    rejects = local_home.catalog.query("SELECT file, line FROM beacon_rejects")
    assert rejects.values.tolist() == [["a.csv", 4]]


def test_a_day_with_only_bots_compiles(local_home: Home) -> None:
    day = "2026-11-22"
    hits = [samples.make_hit(random.Random(i), day) for i in range(20)]
    for h in hits:
        h["user_agent"] = "Googlebot/2.1 (+http://www.google.com/bot.html)"
    samples.write_hits(local_home.beacons, day, hits)
    [stats] = compile_beacon_stats(home=local_home)
    assert stats.bots == 20
    days = local_home.catalog.query("SELECT bots FROM beacon_days")["bots"].tolist()
    assert days == [20]


def test_a_bad_header_value_is_not_quoted_in_warnings_or_logs(
    caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder
) -> None:
    """pydicom warns and logs a bad value with the value itself; such values can be PHI."""
    import io
    import logging

    from dropvault.tasks.dicom import DicomRejected, read_header

    data = bytearray(samples._sample_bytes("CT_small.dcm"))
    at = data.find(b"1.3.6.1.4.1.5962.1.2.1")  # the StudyInstanceUID's value
    data[at + 2 : at + 10] = b"PHIMARK!"
    with caplog.at_level(logging.DEBUG), pytest.raises(DicomRejected) as refused:
        read_header(io.BytesIO(bytes(data)), len(data))
    assert refused.value.reason == "missing_uid"
    said = [r.getMessage() for r in caplog.records] + [str(w.message) for w in recwarn]
    assert not [s for s in said if "PHIMARK" in s]


def test_a_sends_file_that_cannot_be_read_is_set_aside(local_home: Home) -> None:
    from dropvault.tasks.beacons import SENDS

    day = "2026-11-24"
    samples.write_hits(local_home.beacons, day, [samples.make_hit(random.Random(1), day)])
    local_home.beacons.put_bytes(f"{day}/{SENDS}", b"campaign,sends\nnl-1,\xff\xfePHIMARK\n")
    [stats] = compile_beacon_stats(home=local_home)
    assert {"file": SENDS, "line": 0, "reason": "unreadable"} in stats.malformed_lines
    assert [e.name for e in local_home.beacons.list()] == [f"rejected/{day}/{SENDS}"]


# -- regressions from the outside review of this promise ------------------------------


def test_one_hostile_share_line_does_not_stop_other_manifests(
    local_home: Home, rng: random.Random
) -> None:
    [uid] = seed(local_home, {"user:alice": 1}, rng)["user:alice"]
    good = {"request_id": "g", "action": "share", "owner": "user:alice", "study_uid": uid}
    write_manifest(local_home, "a.jsonl", [{**good, "grantee": "user:bob", "requested_at": ts()}])
    hostile = b'{"request_id": 1' + b"0" * 5000 + b"}\n" + b"[" * 100000 + b"\n"
    local_home.manifests.put_bytes("shares/b.jsonl", hostile)
    local_home.manifests.put_bytes("shares/c.csv", b"user:carol,*,share\n")  # no header
    apply_share_manifests(home=local_home)
    assert local_home.catalog.query("SELECT grantee FROM grants")["grantee"].tolist() == [
        "user:bob"
    ]
    done = local_home.manifests.read_bytes("shares/processed/b.jsonl.results.jsonl").decode()
    assert [json.loads(x)["outcome"] for x in done.splitlines()] == ["rejected:malformed"] * 2
    headerless = local_home.manifests.read_bytes("shares/processed/c.csv.results.jsonl")
    assert json.loads(headerless)["outcome"] == "rejected:malformed"


@pytest.mark.timeout(120)
def test_fifos_never_block_a_run(local_home: Home, rng: random.Random) -> None:
    good_drop(local_home, rng, "fac-a", "d1")
    Path(local_home.manifests.path("deletions")).mkdir(parents=True, exist_ok=True)
    os.mkfifo(local_home.manifests.path("deletions", "x.jsonl"))
    day = "2026-11-25"
    samples.write_hits(local_home.beacons, day, [samples.make_hit(random.Random(2), day)])
    os.mkfifo(local_home.beacons.path(day, "fifo.jsonl"))
    deletion_sweep(home=local_home)
    [stats] = compile_beacon_stats(home=local_home)
    assert {"file": "fifo.jsonl", "line": 0, "reason": "unreadable"} in stats.malformed_lines
    assert ingest_drops(home=local_home, settings=QUIET).ingested == 2


def test_a_symlinked_drop_folder_is_not_listed_or_cleaned_through(
    local_home: Home, rng: random.Random, tmp_path: Path
) -> None:
    good_drop(local_home, rng, "fac-a", "d1")
    victim = tmp_path / "victim"
    (victim / "keep-me").mkdir(parents=True)
    Path(local_home.drops.path("fac-a")).joinpath("PHIMARK-drop").symlink_to(victim)
    stats = ingest_drops(home=local_home, settings=QUIET)
    assert stats.ingested == 2 and (victim / "keep-me").is_dir()
    assert reasons(local_home) == ["unreadable"]
    drops = local_home.catalog.query("SELECT status FROM drops ORDER BY status")
    assert drops["status"].tolist() == ["done", "partial"]
    assert ingest_drops(home=local_home, settings=QUIET).ingested == 0


def test_a_drop_manifest_with_text_the_catalog_cannot_hold_waits(
    local_home: Home, rng: random.Random
) -> None:
    good_drop(local_home, rng, "fac-a", "d1")
    doc = {"files": [{"path": "missing.dcm", "size": 10, "sha256": "\udce9"}]}
    local_home.drops.put_bytes("fac-b/d2/manifest.json", json.dumps(doc).encode())
    owners = {"files": [], "owners": {"1.2.3": "\udce9"}}
    local_home.drops.put_bytes("fac-c/d3/x.dcm", samples.not_dicom())
    local_home.drops.put_bytes("fac-c/d3/manifest.json", json.dumps(owners).encode())
    assert ingest_drops(home=local_home, settings=QUIET).ingested == 2


def test_a_header_value_that_overflows_its_column_fails_only_its_file(
    local_home: Home, rng: random.Random
) -> None:
    import io

    import pydicom

    from dropvault.tasks.dicom import DicomHeader, DicomRejected

    good_drop(local_home, rng, "fac-a", "d1")
    ds = pydicom.dcmread(io.BytesIO(samples._sample_bytes("CT_small.dcm")))
    ds.NumberOfFrames = "99999999999"
    ds.Modality = "PHIMARK John Doe 1970"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    local_home.drops.put_bytes("fac-b/d2/big.dcm", out.getvalue())
    stats = ingest_drops(home=local_home, settings=QUIET)
    assert stats.ingested == 2 and reasons(local_home) in (["not_dicom"], ["truncated"])
    with pytest.raises(DicomRejected, match="frames is out of range"):
        DicomHeader("1.2", "1.2", "1.2", None, "CT", None, 512, 512, 2**40)
    modalities = local_home.catalog.query("SELECT DISTINCT modality FROM instances")
    assert modalities["modality"].tolist() == ["CT"]


def test_beacon_logs_with_odd_names_and_line_endings(local_home: Home) -> None:
    day = "2026-11-26"
    hits = [samples.make_hit(random.Random(i), day) for i in range(12)]
    for h in hits:
        h["beacon"], h["user_agent"] = "page_view", samples.AGENTS[0]
    local_home.beacons.put_bytes(
        f"{day}/cr.jsonl", b"\r".join(json.dumps(h).encode() for h in hits) + b'\r{"foo": 1}\r'
    )
    Path(local_home.beacons.path(day)).joinpath("PHIMARK\\x.jsonl").write_bytes(b"{}\n")
    Path(local_home.beacons.path(day)).joinpath("*.jsonl").write_bytes(b"{}\n")
    local_home.beacons.put_bytes(f"{day}/noheader.csv", b"page_view,/,x\npage_view,/,y\n")
    [stats] = compile_beacon_stats(home=local_home)
    assert stats.lines == 13 + 3 and stats.counted == 12
    shown = sorted((m["file"], m["line"]) for m in stats.malformed_lines)
    assert shown == [("(unsafe name)", 0), ("(unsafe name)", 0), ("cr.jsonl", 13)] + [
        ("noheader.csv", 0)
    ]
    assert len([e for e in local_home.beacons.list() if e.name.startswith("rejected/")]) == 3


def test_a_reused_manifest_name_keeps_both_in_processed(
    local_home: Home, rng: random.Random
) -> None:
    [uid] = seed(local_home, {"user:alice": 1}, rng)["user:alice"]
    row = {"action": "share", "owner": "user:alice", "study_uid": uid, "requested_at": ts()}
    write_manifest(local_home, "req.jsonl", [{**row, "request_id": "1", "grantee": "user:b"}])
    apply_share_manifests(home=local_home)
    write_manifest(local_home, "req.jsonl", [{**row, "request_id": "2", "grantee": "user:c"}])
    apply_share_manifests(home=local_home)
    names = sorted(e.name.rsplit("/", 1)[-1] for e in local_home.manifests.list("shares"))
    assert names == [
        "req.2.jsonl",
        "req.2.jsonl.results.jsonl",
        "req.jsonl",
        "req.jsonl.results.jsonl",
    ]


def test_a_file_dated_in_the_future_does_not_hold_its_drop_forever(
    local_home: Home, rng: random.Random
) -> None:
    good_drop(local_home, rng, "fac-a", "d1")
    future = 4102444800  # 2100-01-01
    for entry in local_home.drops.list():
        os.utime(local_home.drops.path(entry.name), (future, future))
    assert ingest_drops(home=local_home, settings=Settings(quiet_seconds=120)).ingested == 2


def test_a_beacon_line_rejected_for_two_reasons_counts_once(local_home: Home) -> None:
    """Found by the fuzzer: not UTF-8 and a stray \\x1f on one line made two rejects of it
    and shifted every later line number past the end of the file."""
    day = "2026-11-27"
    local_home.beacons.put_bytes(f"{day}/a.jsonl", b"\x80\x1fPHIMARK\n{broken\n")
    [stats] = compile_beacon_stats(home=local_home)
    assert sorted((m["line"], m["reason"]) for m in stats.malformed_lines) == [
        (1, "not_utf8"),
        (2, "malformed"),
    ]


def test_a_gzip_bomb_beacon_log_is_set_aside_without_expanding_it(local_home: Home) -> None:
    """1 MiB of gzip that expands to ~1 GiB: refused after its first MiBs, in well under the
    minute DuckDB took to expand it; the good log of the day still compiles."""
    import gzip
    import time

    day = "2026-11-22"
    hits = [samples.make_hit(random.Random(i), day) for i in range(30)]
    samples.write_hits(local_home.beacons, day, hits)
    zeros = gzip.compress(b"\n" * (64 << 20), compresslevel=9)
    local_home.beacons.put_bytes(f"{day}/bomb.jsonl.gz", zeros * 16)  # 16 members: 1 GiB
    started = time.perf_counter()
    [stats] = compile_beacon_stats(home=local_home)
    assert time.perf_counter() - started < 20
    assert stats.lines == 31  # the 30 hits and the bomb's one reject
    rejects = local_home.catalog.query("SELECT file, line, reason FROM beacon_rejects")
    assert rejects.values.tolist() == [["bomb.jsonl.gz", 0, "too_large"]]
    assert [e.name for e in local_home.beacons.list()] == [f"rejected/{day}/bomb.jsonl.gz"]


def test_a_beacon_log_over_the_size_bound_is_set_aside(local_home: Home) -> None:
    day = "2026-11-19"
    hits = [samples.make_hit(random.Random(i), day) for i in range(30)]
    samples.write_hits(local_home.beacons, day, hits)
    bound = local_home.beacons.size(f"{day}/hits.jsonl")
    local_home.beacons.put_bytes(f"{day}/big.jsonl", b"\n" * (bound + 1))
    settings = Settings(beacon_max_log_bytes=bound)
    [stats] = compile_beacon_stats(home=local_home, settings=settings)
    rejects = local_home.catalog.query("SELECT file, reason FROM beacon_rejects")
    assert rejects.values.tolist() == [["big.jsonl", "too_large"]]
    assert stats.lines == 31


def test_files_outside_any_drop_folder_are_reported_and_left(
    local_home: Home, rng: random.Random
) -> None:
    good_drop(local_home, rng, "fac-a", "d1")
    local_home.drops.put_bytes("fac-a/loose.dcm", b"x" * 10)
    stats = ingest_drops(home=local_home, settings=QUIET)
    assert (stats.ingested, stats.drops_waiting) == (2, 1)
    assert [e.name for e in sources(local_home.drops)] == ["fac-a/loose.dcm"]
    assert "outside any drop folder" in str(
        scan_drops(local_home.drops, local_home.pepper, 10**10, 0, 86400)[0].why
    )


def test_a_writers_leftover_temporary_file_is_accounted_for_once_stale(
    local_home: Home, rng: random.Random
) -> None:
    good_drop(local_home, rng, "fac-a", "d1")
    local_home.drops.put_bytes("fac-a/d1/.tmp-abc", b"half a file")
    settings = Settings(quiet_seconds=0, incomplete_seconds=3600)
    assert ingest_drops(home=local_home, settings=settings).ingested == 2
    assert [e.name for e in sources(local_home.drops)] == ["fac-a/d1/.tmp-abc"]  # in flight
    old = time.time() - 7200
    os.utime(local_home.drops.path("fac-a/d1/.tmp-abc"), (old, old))
    stats = ingest_drops(home=local_home, settings=settings)
    assert dict(stats.quarantined) == {"not_dicom": 1}
    assert sources(local_home.drops) == []


def test_a_file_where_the_processed_folder_goes_does_not_stop_archiving(
    local_home: Home, rng: random.Random
) -> None:
    [uid] = seed(local_home, {"user:alice": 1}, rng)["user:alice"]
    local_home.manifests.put_bytes("shares/processed", b"someone's upload")
    row = {"action": "share", "owner": "user:alice", "study_uid": uid, "requested_at": ts()}
    write_manifest(local_home, "req.jsonl", [{**row, "request_id": "1", "grantee": "user:b"}])
    apply_share_manifests(home=local_home)
    names = sorted(e.name for e in local_home.manifests.list("shares"))
    assert names == [
        "shares/processed.file",
        "shares/processed/req.jsonl",
        "shares/processed/req.jsonl.results.jsonl",
    ]
    assert local_home.catalog.query("SELECT count(*) AS n FROM grants")["n"][0] == 1


def unprivileged() -> list[str]:
    """A command prefix that runs without root's power to ignore permissions (as a
    service account would), or skips the test where that cannot be had."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("needs setpriv to drop root's DAC override")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--"]


@pytest.mark.integration
def test_folders_a_service_account_cannot_list_or_empty_stop_nothing(
    local_home: Home, rng: random.Random
) -> None:
    """An unlistable drop folder, a facility folder that cannot be written (an SFTP
    chroot), and a FIFO where a drop folder goes, beside good drops: one run ingests and
    records every good drop, and no folder name reaches the output."""
    import stat
    import subprocess

    from tests.helpers import EXE, cli_env

    drops = local_home.drops
    good_drop(local_home, rng, "fac3", "ZQXgood")
    good_drop(local_home, rng, "fac3", "ZQXlocked")
    good_drop(local_home, rng, "fac5", "ZQXchroot")
    good_drop(local_home, rng, "fac6", "ZQXgood2")
    os.mkfifo(drops.path("fac6/ZQXfifo"))
    locked, chroot = Path(drops.path("fac3/ZQXlocked")), Path(drops.path("fac5"))
    locked.chmod(0)
    chroot.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    try:
        root = local_home.catalog.path.parent
        env = {**cli_env(root), "DROPVAULT_QUIET_SECONDS": "0"}
        proc = subprocess.run(  # noqa: S603 - our own CLI
            [*unprivileged(), EXE, "ingest"], env=env, capture_output=True, text=True, timeout=300
        )
    finally:
        locked.chmod(0o755)
        chroot.chmod(0o755)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ZQX" not in proc.stdout + proc.stderr
    rows = local_home.catalog.query(
        "SELECT drop_id, status, ingested FROM drops ORDER BY ingested DESC, status"
    )
    assert sorted(rows["ingested"].tolist()) == [0, 0, 2, 2, 2]  # locked and the FIFO: 0
    assert instances(local_home) == 6


def test_a_gzip_zlib_refuses_is_set_aside_not_expanded_by_duckdb(local_home: Home) -> None:
    """A gzip header with unknown flags: zlib refuses it, DuckDB would read it unbounded."""
    import gzip

    day = "2026-11-18"
    hits = [samples.make_hit(random.Random(i), day) for i in range(30)]
    samples.write_hits(local_home.beacons, day, hits)
    flagged = bytearray(gzip.compress(b"\n".join(json.dumps(h).encode() for h in hits)))
    flagged[3] = 0x80  # FLG: a reserved bit
    local_home.beacons.put_bytes(f"{day}/odd.jsonl.gz", bytes(flagged))
    [stats] = compile_beacon_stats(home=local_home)
    rejects = local_home.catalog.query("SELECT file, reason FROM beacon_rejects")
    assert rejects.values.tolist() == [["odd.jsonl.gz", "unreadable"]]
    assert stats.lines == 31


def test_odd_day_folders_and_files_are_accounted_for_and_stop_nothing(local_home: Home) -> None:
    hits = [samples.make_hit(random.Random(i), "2026-11-17") for i in range(30)]
    samples.write_hits(local_home.beacons, "20260210", hits)  # not YYYY-MM-DD
    samples.write_hits(local_home.beacons, "2026-11-17", hits)
    local_home.beacons.put_bytes("2026-11-17/more.log", b"x")
    [stats] = compile_beacon_stats(home=local_home)
    assert stats.day == "2026-11-17"
    rejects = local_home.catalog.query("SELECT file, reason FROM beacon_rejects")
    assert rejects.values.tolist() == [["more.log", "not_a_log"]]
    assert "rejected/2026-11-17/more.log" in [e.name for e in local_home.beacons.list()]


def test_a_folder_swapped_for_a_symlink_cannot_redirect_a_delete(
    local_home: Home, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "1.dcm").write_bytes(b"someone else's")
    drops = local_home.drops
    drops.put_bytes("fac/D/sub/1.dcm", b"ours")
    sub = Path(drops.path("fac/D/sub"))
    (sub / "1.dcm").unlink()
    sub.rmdir()
    sub.symlink_to(victim)  # after the listing, before the unlink
    with pytest.raises(OSError) as refused:
        drops.delete("fac/D/sub/1.dcm", unchecked=True)
    assert refused.value.errno in (errno.ELOOP, errno.ENOTDIR)  # never followed
    assert (victim / "1.dcm").read_bytes() == b"someone else's"


@pytest.mark.parametrize("name", ["*", "[ab]"])
def test_glob_characters_in_names_never_touch_other_files(
    home: Home, rng: random.Random, name: str
) -> None:
    """Removing the source ``fac/*/s/0000.dcm`` must not remove ``fac/waiting/s/0000.dcm``
    of a drop still waiting for its manifest (an S3 rm expands the glob)."""
    _, files = samples.make_study(rng, samples.make_patient(rng, 1), 1, "CT_small.dcm")
    data = next(iter(files.values()))
    home.drops.put_bytes(f"fac/{name}/s/0000.dcm", data)
    home.drops.put_bytes("fac/a/s/0000.dcm", data)  # [ab] and ? match this folder
    waiting = {"s/0000.dcm": data, "s/missing.dcm": b"x" * 10}
    samples.write_drop(home.drops, "fac", "waiting", {"s/0000.dcm": data}, listed=waiting)
    stats = ingest_drops(home=home, settings=QUIET)
    assert stats.drops_waiting == 1
    left = sorted(e.name for e in home.drops.list())
    assert "fac/waiting/s/0000.dcm" in left and f"fac/{name}/s/0000.dcm" not in left


def test_a_beacon_line_of_megabytes_does_not_set_its_file_aside(local_home: Home) -> None:
    day = "2026-11-16"
    lines = [json.dumps(samples.make_hit(random.Random(i), day)) for i in range(30)]
    lines[5] = json.dumps({"beacon": "page_view", "target": "/x" * 3_500_000})  # 7 MB
    local_home.beacons.put_bytes(f"{day}/a.jsonl", ("\n".join(lines) + "\n").encode())
    [stats] = compile_beacon_stats(home=local_home)
    assert (stats.lines, stats.malformed) == (30, 0)
