"""Property-based attacks on every parser that takes outside input.

Each property drives a parser with generated hostile input and checks three things: no
exception escapes, every input is accounted for exactly once, and no input's raw text comes
out in a log or an error. Example counts are bounded (``max_examples``) so the suite keeps
its time, and the examples are the same on every run, so CI is repeatable. To explore new
ones, run with ``DROPVAULT_FUZZ_RANDOM=1`` (and ``--hypothesis-seed=N`` to replay one); each
failure found that way becomes a regression test in tests/test_isolation.py.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import logging
import os
import random
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dropvault.storage.catalog import Catalog
from dropvault.storage.home import Home
from dropvault.storage.locations import Location
from dropvault.tasks import samples
from dropvault.tasks.beacons import compile_day
from dropvault.tasks.deletion import register_requests
from dropvault.tasks.dicom import DicomRejected, header_from_bytes
from dropvault.tasks.drops import scan_drops
from dropvault.tasks.ingest import ingest_batch
from dropvault.tasks.manifests import parse_manifest
from dropvault.tasks.sharing import apply_requests

MARK = "PHIMARK"  # put in every generated input; it must never come out in a log or error
EXPLORE = bool(os.environ.get("DROPVAULT_FUZZ_RANDOM"))
FUZZ = settings(
    max_examples=25,
    derandomize=not EXPLORE,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
NOW = datetime.now(UTC)

# Text that manifests, logs and names really carry, plus what breaks naive code: lone
# surrogates (bytes that were not UTF-8), NUL, separators, huge and far-off dates.
nasty_text = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        [
            "9999-12-31T23:59:59-23:59",
            "0001-01-01T00:00:00+01:00",
            "2026-02-30",
            "1e400",
            "\udce9",
            "a\x00b",
            "../../etc/passwd",
            "*",
            "",
            " ",
            "user:alice",
            "1.2.3",
            "true",
            "-1",
            "\u202e",
            "x" * 5000,
        ]
    ),
)
field_names = st.sampled_from(
    [
        "request_id",
        "action",
        "owner",
        "grantee",
        "study_uid",
        "requested_at",
        "expires_at",
        "purpose",
        "keep_archive",
    ]
)


def _captured(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


@contextlib.contextmanager
def _no_leak(caplog: pytest.LogCaptureFixture):  # type: ignore[no-untyped-def]
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        try:
            yield
        except Exception as exc:  # the property fails either way; say which way
            raise AssertionError(f"{type(exc).__name__} escaped: {str(exc)[:300]}") from exc
    assert MARK not in _captured(caplog)


@FUZZ
@given(
    rows=st.lists(
        st.dictionaries(field_names, st.one_of(nasty_text, st.integers(), st.none())),
        max_size=8,
    ),
    csv=st.booleans(),
)
def test_share_and_deletion_rows_never_escape(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, rows: list[dict], csv: bool
) -> None:
    catalog = Catalog(tmp_path / f"c{uuid.uuid4().hex}.duckdb")
    catalog.migrate()
    for row in rows:
        row["purpose"] = MARK
    if csv:
        cols = sorted({k for r in rows for k in r}) or ["request_id"]
        text = ",".join(cols) + "\n"
        text += "".join(",".join(str(r.get(c, "")) for c in cols) + "\n" for r in rows)
        name, raw = "shares/m.csv", text.encode("utf-8", "surrogateescape")
    else:
        text = "".join(json.dumps(r) + "\n" for r in rows)
        name, raw = "shares/m.jsonl", text.encode()
    parsed = parse_manifest(name, raw)
    with _no_leak(caplog):
        shares = catalog.write(lambda con: apply_requests(con, parsed, NOW))
        deletions = catalog.write(lambda con: register_requests(con, parsed, NOW))
    for result in (shares, deletions):
        outcomes = result.outcomes.get(name, [])
        assert len(outcomes) == len(parsed)  # every row accounted for, once


@FUZZ
@given(raw=st.binary(max_size=400), csv=st.booleans())
def test_manifest_bytes_always_parse_to_rows(raw: bytes, csv: bool) -> None:
    rows = parse_manifest("shares/x.csv" if csv else "shares/x.jsonl", raw)
    assert all(r.fields is not None or r.error for r in rows)


line_bytes = st.one_of(
    st.binary(max_size=60),
    st.builds(
        lambda d: json.dumps(d).encode(),
        st.dictionaries(
            st.sampled_from(["beacon", "target", "partner", "visitor_id", "ip", "ts", "x"]),
            st.one_of(nasty_text, st.integers(), st.booleans(), st.none()),
            max_size=6,
        ),
    ),
)


@FUZZ
@given(
    lines=st.lists(line_bytes, min_size=1, max_size=30),
    kind=st.sampled_from(["a.jsonl", "a.jsonl.gz", "a.csv", "a.csv.gz"]),
)
def test_beacon_logs_always_compile(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, lines: list[bytes], kind: str
) -> None:
    run = tmp_path / f"r{uuid.uuid4().hex}"
    beacons = Location(f"file://{run}/beacons")
    exports = Location(f"file://{run}/exports")
    catalog = Catalog(run / "c.duckdb")
    catalog.migrate()
    day = "2026-11-20"
    marked = [line.replace(b"\n", b" ") + MARK.encode() for line in lines]
    if kind.startswith("a.csv"):
        marked = [b"beacon,target,partner,visitor_id,ip,user_agent,third_party", *marked]
    data = b"\n".join(marked) + b"\n"
    if kind.endswith(".gz"):
        data = gzip.compress(data)
    beacons.put_bytes(f"{day}/{kind}", data)
    with _no_leak(caplog):
        stats = compile_day(beacons, exports, catalog, b"p" * 32, day)
    rejects = catalog.query("SELECT * FROM beacon_rejects").to_string()
    assert MARK not in rejects
    assert stats.malformed == len(stats.malformed_lines)
    assert all(0 <= m["line"] <= len(marked) for m in stats.malformed_lines)


NAMES = st.one_of(
    st.text(
        alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="/\x00"),
        min_size=1,
        max_size=20,
    ),
    st.sampled_from(["..", ".", "x" * 255, "caf\udce9", "\udcff", " ", "-", "manifest.json"]),
)
KINDS = st.sampled_from(["dicom", "junk", "empty", "symlink", "fifo", "dir_symlink"])


def _make(path: Path, kind: str, rng: random.Random, outside: Path) -> bool:
    """Create one entry; False when the filesystem refuses the name."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            return False
        if kind == "dicom":
            _, files = samples.make_study(rng, samples.make_patient(rng, 1), 1, "CT_small.dcm")
            path.write_bytes(next(iter(files.values())))
        elif kind == "junk":
            path.write_bytes(MARK.encode() + bytes(rng.randrange(256) for _ in range(50)))
        elif kind == "empty":
            path.write_bytes(b"")
        elif kind == "symlink":
            path.symlink_to(outside / "secret.dcm")
        elif kind == "dir_symlink":
            path.symlink_to(outside)
        else:
            os.mkfifo(path)
    except OSError:
        return False
    return True


@settings(
    max_examples=12,
    derandomize=not EXPLORE,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    tree=st.lists(
        st.tuples(st.lists(NAMES, min_size=1, max_size=3), KINDS), min_size=1, max_size=8
    ),
    seed=st.integers(0, 1000),
)
def test_drop_trees_never_stop_ingest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, tree: list, seed: int
) -> None:
    from tests.conftest import make_home

    run = tmp_path / f"r{uuid.uuid4().hex}"
    home: Home = make_home("file", run)
    home.catalog.migrate()
    outside = run / "outside"
    outside.mkdir()
    (outside / "secret.dcm").write_bytes(MARK.encode())
    rng = random.Random(seed)
    made = 0
    for parts, kind in tree:
        where = Path(home.drops.path("fac-fuzz", "d1"))
        made += _make(where.joinpath(*parts), kind, rng, outside)
    with _no_leak(caplog):
        drops = scan_drops(home.drops, home.pepper, time.time() + 3600, 0, 86400, home.catalog)
        work = [(d, f) for d in drops for f in d.files]
        stats = ingest_batch(home, work, max_file_bytes=10**8) if work else None
    if stats is not None:
        quarantined = sum(stats.quarantined.values())
        assert stats.files_seen == stats.ingested + stats.duplicates + quarantined
        assert stats.files_seen == len(work)
    assert (outside / "secret.dcm").read_bytes() == MARK.encode()  # never followed or moved
    cataloged = home.catalog.query("SELECT count(*) AS n FROM instances")["n"][0]
    assert cataloged <= made


@FUZZ
@given(
    cuts=st.lists(st.tuples(st.integers(0, 20000), st.binary(min_size=1, max_size=8)), max_size=6),
    stop=st.integers(0, 40000),
)
def test_mutated_dicom_is_accepted_or_rejected_with_a_reason(
    cuts: list[tuple[int, bytes]], stop: int
) -> None:
    data = bytearray(samples._sample_bytes("CT_small.dcm"))
    for at, junk in cuts:
        at = at % max(len(data), 1)
        data[at : at + len(junk)] = junk
    data = data[: stop or len(data)]
    try:
        header_from_bytes(bytes(data))
    except DicomRejected as exc:
        assert exc.reason and MARK not in str(exc)
    buffer = io.BytesIO(bytes(data))  # the stream path agrees on the same bytes
    from dropvault.tasks.dicom import read_header

    with contextlib.suppress(DicomRejected):
        read_header(buffer, len(data))
