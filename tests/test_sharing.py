"""Sharing: manifests, rejections, access readers, expiry, wildcard scope, incidents, dry run."""

from __future__ import annotations

import json
import random
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dropvault.flows.sharing import apply_share_manifests, report_wrong_access
from dropvault.storage.catalog import Catalog
from dropvault.storage.home import Home
from dropvault.tasks.incidents import file_incident_request
from dropvault.tasks.manifests import parse_manifest
from dropvault.tasks.sharing import (
    access_list,
    apply_share_rows,
    can_access,
    disclosures_for,
    who_can_access,
)
from tests.helpers import NOW, req, seed, ts, write_manifest


@pytest.fixture
def shared(local_home: Home, rng: random.Random) -> tuple[Home, dict[str, list[str]]]:
    return local_home, seed(local_home, {"user:alice": 2, "user:bob": 1}, rng)


def test_share_then_list_then_revoke(shared: tuple[Home, dict[str, list[str]]]) -> None:
    home, studies = shared
    a1 = studies["user:alice"][0]
    write_manifest(home, "m1.jsonl", [req("r1", "share", "user:alice", "dr:carol", a1, -2)])
    result = apply_share_manifests(home=home)
    assert result.applied == 1 and result.added
    acl = access_list(home.catalog, "user:alice")
    assert list(acl[["grantee", "scope", "status"]].itertuples(index=False, name=None)) == [
        ("dr:carol", "study", "active")
    ]
    assert can_access(home.catalog, "dr:carol", a1)
    assert set(who_can_access(home.catalog, a1)["user_id"]) == {"user:alice", "dr:carol"}
    # Processed: moved, with per-row results beside it.
    assert not home.manifests.exists("shares/m1.jsonl")
    results = home.manifests.read_bytes("shares/processed/m1.jsonl.results.jsonl").decode()
    assert json.loads(results.splitlines()[0])["outcome"] == "applied"

    write_manifest(home, "m2.csv", [req("r2", "revoke", "user:alice", "dr:carol", a1, -1)])
    apply_share_manifests(home=home)
    assert access_list(home.catalog, "user:alice")["status"].tolist() == ["revoked"]
    assert not can_access(home.catalog, "dr:carol", a1)
    events = home.catalog.query(
        "SELECT action, actor FROM grant_events WHERE grantee = 'dr:carol' ORDER BY requested_at"
    )
    assert events.values.tolist() == [["share", "user:alice"], ["revoke", "user:alice"]]


def test_older_revoke_does_not_cancel_later_share(
    shared: tuple[Home, dict[str, list[str]]],
) -> None:
    home, studies = shared
    a1 = studies["user:alice"][0]
    write_manifest(home, "late.jsonl", [req("s", "share", "user:alice", "dr:x", a1, -1)])
    apply_share_manifests(home=home)
    write_manifest(home, "early.jsonl", [req("r", "revoke", "user:alice", "dr:x", a1, -3)])
    apply_share_manifests(home=home)
    assert can_access(home.catalog, "dr:x", a1)


def test_replay_changes_nothing(shared: tuple[Home, dict[str, list[str]]]) -> None:
    home, studies = shared
    rows = [req("r1", "share", "user:alice", "dr:x", studies["user:alice"][0], -1)]
    write_manifest(home, "a.jsonl", rows)
    apply_share_manifests(home=home)
    before = home.catalog.query("SELECT * FROM grants")
    write_manifest(home, "a-again.jsonl", rows)
    result = apply_share_manifests(home=home)
    assert result.duplicates == 1 and result.applied == 0
    assert home.catalog.query("SELECT * FROM grants").equals(before)


def test_every_rejection_reason_while_good_rows_apply(
    shared: tuple[Home, dict[str, list[str]]],
) -> None:
    home, studies = shared
    a1, b1 = studies["user:alice"][0], studies["user:bob"][0]
    write_manifest(home, "first.jsonl", [req("dup", "share", "user:alice", "dr:x", a1, -5)])
    apply_share_manifests(home=home)
    good = req("good", "share", "user:alice", "dr:y", a1, -1)
    bad = {
        "unknown_study": req("b1", "share", "user:alice", "dr:y", "1.2.3.999", -1),
        "not_owner": req("b2", "share", "user:alice", "dr:y", b1, -1),
        "grantee_is_owner": req("b3", "share", "user:alice", "user:alice", a1, -1),
        "bad_timestamp": {
            **req("b4", "share", "user:alice", "dr:y", a1, -1),
            "requested_at": "yesterday",
        },
        "unknown_action": req("b5", "borrow", "user:alice", "dr:y", a1, -1),
        "missing_field": {
            k: v
            for k, v in req("b6", "share", "user:alice", "dr:y", a1, -1).items()
            if k != "grantee"
        },
        "duplicate_request_id": req("dup", "share", "user:alice", "dr:z", a1, -1),
    }
    lines = [json.dumps(good)] + [json.dumps(r) for r in bad.values()] + ["{not json"]
    home.manifests.put_bytes("shares/mixed.jsonl", ("\n".join(lines) + "\n").encode())
    home.manifests.put_bytes(
        "shares/broken.csv",
        b'request_id,action,owner,grantee,study_uid,requested_at\nx,y\n"unterminated,share\n',
    )
    result = apply_share_manifests(home=home)
    assert result.applied == 1
    assert result.rejected == {reason: 1 for reason in bad} | {"malformed": 3}
    assert can_access(home.catalog, "dr:y", a1)
    outcomes = [
        json.loads(x)["outcome"]
        for x in home.manifests.read_bytes(
            "shares/processed/mixed.jsonl.results.jsonl"
        ).splitlines()
    ]
    assert sorted(outcomes) == sorted(
        ["applied", "rejected:malformed"] + [f"rejected:{r}" for r in bad]
    )
    rejected = home.catalog.query(
        "SELECT outcome FROM share_requests"
        " WHERE outcome LIKE 'rejected:%' AND manifest LIKE '%mixed%'"
    )
    assert len(rejected) == len(bad) + 1


def test_expired_grant_stops_counting(shared: tuple[Home, dict[str, list[str]]]) -> None:
    home, studies = shared
    a1 = studies["user:alice"][0]
    write_manifest(
        home, "e.jsonl", [req("e1", "share", "user:alice", "dr:x", a1, -10, expires_at=ts(-1))]
    )
    apply_share_manifests(home=home)
    assert access_list(home.catalog, "user:alice")["status"].tolist() == ["expired"]
    assert not can_access(home.catalog, "dr:x", a1)


def test_wildcard_covers_later_studies(
    shared: tuple[Home, dict[str, list[str]]], rng: random.Random
) -> None:
    home, _ = shared
    write_manifest(home, "w.jsonl", [req("w1", "share", "user:bob", "dr:w", "*", -1)])
    apply_share_manifests(home=home)
    later = seed(home, {"user:bob": 1}, rng)["user:bob"][0]
    assert can_access(home.catalog, "dr:w", later)
    assert access_list(home.catalog, "user:bob")["scope"].tolist() == ["all"]


def test_incident_revokes_traces_and_reports(shared: tuple[Home, dict[str, list[str]]]) -> None:
    home, studies = shared
    a1 = studies["user:alice"][0]
    write_manifest(
        home,
        "i.jsonl",
        [
            req("i1", "share", "user:alice", "dr:eve", "*", -3),
            req("i2", "share", "user:alice", "dr:eve", a1, -2),
            req("i3", "share", "user:alice", "dr:ok", a1, -2),
        ],
    )
    apply_share_manifests(home=home)
    reported = NOW - timedelta(days=1)
    request = file_incident_request(home.manifests, "dr:eve", a1, reported)
    incident = report_wrong_access(request, home=home)
    assert len(incident.revoked) == 2
    assert not can_access(home.catalog, "dr:eve", a1)
    assert can_access(home.catalog, "dr:ok", a1)
    assert incident.notify_by == reported + timedelta(days=60)
    assert (reported + timedelta(days=60)).date().isoformat() in incident.report_md
    assert {p["user_id"] for p in incident.people} == {"dr:eve", "dr:ok"}
    reasons = home.catalog.query(
        "SELECT DISTINCT revoke_reason FROM grants WHERE grantee = 'dr:eve'"
    )
    assert reasons["revoke_reason"].tolist() == ["incident"]
    assert home.manifests.exists(f"incidents/{incident.incident_id}.md")
    assert home.catalog.query("SELECT count(*) AS n FROM incidents")["n"].iloc[0] == 1


def test_disclosure_accounting_window(shared: tuple[Home, dict[str, list[str]]]) -> None:
    home, studies = shared
    a1 = studies["user:alice"][0]
    write_manifest(
        home,
        "d.jsonl",
        [
            req("d1", "disclose", "user:alice", "court:7", a1, -365, purpose="subpoena"),
            req("d2", "disclose", "user:alice", "registry:x", "*", -365 * 7, purpose="registry"),
            req("d3", "disclose", "user:alice", "court:8", a1, -10),  # no purpose: rejected
        ],
    )
    result = apply_share_manifests(home=home)
    assert result.disclosures == 2 and result.rejected == {"missing_field": 1}
    acct = disclosures_for(home.catalog, "user:alice")
    assert acct["recipient"].tolist() == ["court:7"]  # the 7-year-old one is outside 6 years
    assert acct["description"].tolist() == ["one study"]
    assert len(disclosures_for(home.catalog, "user:alice", since=NOW - timedelta(days=3000))) == 2
    assert not can_access(home.catalog, "court:7", a1)  # a disclosure is not a grant


def test_dry_run_changes_nothing(shared: tuple[Home, dict[str, list[str]]]) -> None:
    home, studies = shared
    write_manifest(
        home, "dry.jsonl", [req("x1", "share", "user:alice", "dr:d", studies["user:alice"][0], -1)]
    )
    result = apply_share_manifests(home=home, dry_run=True)
    assert result.added and result.applied == 1
    assert home.manifests.exists("shares/dry.jsonl")
    counts = home.catalog.query(
        "SELECT (SELECT count(*) FROM grants) AS g, (SELECT count(*) FROM share_requests) AS r"
    )
    assert counts.values.tolist() == [[0, 0]]


# -- order independence (property-based) -------------------------------------------------

OWNERS = ["o:1", "o:2"]
GRANTEES = ["g:1", "g:2", "g:3"]
STUDIES = {"o:1": ["1.2.1", "1.2.2"], "o:2": ["1.2.3"]}


def fresh_catalog(tmp: Path) -> Catalog:
    catalog = Catalog(tmp / f"{uuid.uuid4().hex}.duckdb")
    catalog.migrate()
    rows = [(s, "pk", o, "fac", "rk") for o, studies in STUDIES.items() for s in studies]
    catalog.write(
        lambda con: con.executemany(
            "INSERT INTO studies (study_uid, patient_key, owner, facility_id, record_key_id,"
            " status, created_at) VALUES (?, ?, ?, ?, ?, 'active', now())",
            rows,
        )
    )
    return catalog


request_strategy = st.builds(
    lambda action, owner, grantee, pick, minute: {
        "action": action,
        "owner": owner,
        "grantee": grantee,
        "study_uid": "*" if pick == 0 else STUDIES[owner][pick % len(STUDIES[owner])],
        "requested_at": (datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=minute)).isoformat(),
    },
    st.sampled_from(["share", "revoke"]),
    st.sampled_from(OWNERS),
    st.sampled_from(GRANTEES),
    st.integers(0, 3),
    st.integers(0, 50),
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    requests=st.lists(request_strategy, min_size=1, max_size=25),
    seed_value=st.integers(0, 2**32),
    parts=st.integers(1, 5),
)
def test_final_access_is_independent_of_manifest_split_and_order(
    tmp_path: Path, requests: list[dict[str, str]], seed_value: int, parts: int
) -> None:
    rows = [{"request_id": f"r{i}", **r} for i, r in enumerate(requests)]
    rng = random.Random(seed_value)

    def as_manifests(chunks: list[list[dict[str, str]]]) -> list[list]:  # type: ignore[type-arg]
        return [
            parse_manifest(f"m{i}.jsonl", "".join(json.dumps(r) + "\n" for r in chunk).encode())
            for i, chunk in enumerate(chunks)
        ]

    reference = fresh_catalog(tmp_path)
    for manifest in as_manifests([rows]):
        apply_share_rows(reference, manifest, NOW)
    # Shuffled, with some rows repeated, split into `parts` manifests applied in random order.
    mixed = rows + rng.sample(rows, k=min(len(rows), 3))
    rng.shuffle(mixed)
    cuts = (
        sorted(rng.sample(range(1, len(mixed)), k=min(parts - 1, len(mixed) - 1)))
        if len(mixed) > 1
        else []
    )
    chunks = [mixed[a:b] for a, b in zip([0, *cuts], [*cuts, len(mixed)], strict=True)]
    other = fresh_catalog(tmp_path)
    for manifest in as_manifests(chunks):
        apply_share_rows(other, manifest, NOW)
    query = "SELECT owner, grantee, study_uid, status FROM access_list ORDER BY ALL"
    assert reference.query(query).values.tolist() == other.query(query).values.tolist()
