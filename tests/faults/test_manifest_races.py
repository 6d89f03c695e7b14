"""Manifest races: revoke before share, replays, unknown ids, clock skew, and a deletion
racing an ingest. The state converges whatever the arrival order, and the tombstone wins."""

from __future__ import annotations

import json
import random
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from dropvault.flows.deletion import deletion_sweep
from dropvault.flows.ingest import ingest_drops
from dropvault.flows.settings import Settings
from dropvault.flows.sharing import apply_share_manifests
from dropvault.storage.home import Home
from dropvault.tasks import samples
from dropvault.tasks.sharing import access_list, can_access
from tests.helpers import req, seed, sources, write_manifest

pytestmark = pytest.mark.integration


@pytest.fixture
def shared(local_home: Home) -> tuple[Home, dict[str, list[str]]]:
    return local_home, seed(local_home, {"user:alice": 2, "user:bob": 1}, random.Random(21))


def test_revoke_arriving_before_its_share_still_wins(
    shared: tuple[Home, dict[str, list[str]]],
) -> None:
    home, studies = shared
    a1 = studies["user:alice"][0]
    write_manifest(home, "1.jsonl", [req("rv", "revoke", "user:alice", "dr:x", a1, -1)])
    apply_share_manifests(home=home)
    write_manifest(home, "2.jsonl", [req("sh", "share", "user:alice", "dr:x", a1, -2)])
    apply_share_manifests(home=home)
    assert not can_access(home.catalog, "dr:x", a1)


def test_replays_and_reused_ids_change_nothing(shared: tuple[Home, dict[str, list[str]]]) -> None:
    home, studies = shared
    a1 = studies["user:alice"][0]
    rows = [req("r1", "share", "user:alice", "dr:x", a1, -1)]
    for i in range(3):
        write_manifest(home, f"replay-{i}.jsonl", rows)
        apply_share_manifests(home=home)
    reused = [req("r1", "revoke", "user:alice", "dr:x", a1, -0.5)]  # same id, other content
    write_manifest(home, "reused.jsonl", reused)
    result = apply_share_manifests(home=home)
    assert result.rejected == {"duplicate_request_id": 1}
    assert can_access(home.catalog, "dr:x", a1)
    assert home.catalog.query("SELECT count(*) AS n FROM grant_events")["n"][0] == 1


def test_unknown_ids_are_rejected_and_known_ones_apply(
    shared: tuple[Home, dict[str, list[str]]],
) -> None:
    home, studies = shared
    a1, b1 = studies["user:alice"][0], studies["user:bob"][0]
    rows = [
        req("u1", "share", "user:alice", "dr:x", "1.2.826.0.1.3680043.9.9.9", -1),
        req("u2", "share", "user:nobody", "dr:x", a1, -1),
        req("u3", "revoke", "user:alice", "dr:x", b1, -1),
        req("ok", "share", "user:alice", "dr:y", a1, -1),
    ]
    write_manifest(home, "mixed.jsonl", rows)
    result = apply_share_manifests(home=home)
    assert result.applied == 1
    assert result.rejected == {"unknown_study": 1, "not_owner": 2}
    assert access_list(home.catalog, "user:alice")["grantee"].tolist() == ["dr:y"]


def test_clock_skew_cannot_pin_a_grant_against_later_revokes(
    shared: tuple[Home, dict[str, list[str]]],
) -> None:
    """A share dated a year ahead would outrank every revoke for a year: it is refused.
    A few minutes ahead (an ordinary clock skew) is accepted."""
    home, studies = shared
    a1, a2 = studies["user:alice"]
    write_manifest(
        home,
        "skew.jsonl",
        [
            req("far", "share", "user:alice", "dr:x", a1, 365),
            req("near", "share", "user:alice", "dr:y", a2, 3 / 1440),
        ],
    )
    result = apply_share_manifests(home=home)
    assert result.rejected == {"bad_timestamp": 1} and result.applied == 1
    write_manifest(home, "revoke.jsonl", [req("rv", "revoke", "user:alice", "dr:y", a2, 4 / 1440)])
    apply_share_manifests(home=home)
    assert not can_access(home.catalog, "dr:x", a1) and not can_access(home.catalog, "dr:y", a2)
    future = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    row = {"request_id": "d1", "owner": "user:alice", "study_uid": a1, "requested_at": future}
    home.manifests.put_bytes("deletions/future.jsonl", (json.dumps(row) + "\n").encode())
    sweep = deletion_sweep(home=home, settings=Settings.load())
    assert sweep.intake.rejected == {"bad_timestamp": 1}
    assert home.catalog.query("SELECT count(*) AS n FROM studies")["n"][0] == 3


@pytest.mark.parametrize("seed_value", [1, 2, 3])
def test_deletion_racing_ingest_converges_and_the_tombstone_wins(
    local_home: Home, seed_value: int
) -> None:
    home = local_home
    rng = random.Random(seed_value)
    patient = samples.make_patient(rng, 1)
    uid, files = samples.make_study(rng, patient, 6, "MR_small.dcm")
    names = sorted(files)
    first = {n: files[n] for n in names[:2]}
    samples.write_drop(home.drops, "fac", "early", first, owners={uid: "user:eve"})
    settings = Settings.load(quiet_seconds=0)
    ingest_drops(home=home, settings=settings, orphan_grace_seconds=0)
    rest = {n: files[n] for n in names[2:]}
    samples.write_drop(home.drops, "fac", "late", rest, owners={uid: "user:eve"})
    requested = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    row = {"request_id": "del", "owner": "user:eve", "study_uid": uid, "requested_at": requested}
    home.manifests.put_bytes("deletions/eve.jsonl", (json.dumps(row) + "\n").encode())

    errors: list[BaseException] = []

    def guarded(fn: object) -> None:
        try:
            fn()  # type: ignore[operator]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    runs = [
        lambda: ingest_drops(home=home, settings=settings, orphan_grace_seconds=3600),
        lambda: deletion_sweep(home=home, settings=settings),
    ]
    if seed_value % 2:
        runs.reverse()
    threads = [threading.Thread(target=guarded, args=(r,)) for r in runs]
    for t in threads:
        t.start()
        time.sleep(0.05 * seed_value)
    for t in threads:
        t.join(300)
    assert errors == []
    # Let both settle: the next ingest and sweep see whatever the race left.
    ingest_drops(home=home, settings=settings, orphan_grace_seconds=0)
    deletion_sweep(home=home, settings=settings)

    q = home.catalog.query
    assert q("SELECT count(*) AS n FROM instances WHERE study_uid = ?", [uid])["n"][0] == 0
    assert q("SELECT count(*) AS n FROM studies WHERE study_uid = ?", [uid])["n"][0] == 0
    assert q("SELECT status FROM deletion_requests")["status"].tolist() == ["completed"]
    assert q("SELECT count(*) AS n FROM tombstones")["n"][0] == 1
    late = q("SELECT reason FROM quarantine")["reason"].tolist()
    assert set(late) <= {"deleted_by_owner"}
    assert sources(home.drops) == [] and home.vault.list() == []
    # A quarantined late file is gone too once its study's tombstone is swept, or it is kept
    # encrypted under a key of its own, never readable as the deleted study.
    assert q("SELECT count(*) AS n FROM instances")["n"][0] == 0


def test_a_sweep_between_an_ingests_plan_and_its_encryption(local_home: Home) -> None:
    """The race the threaded test above meets now and then, made certain: the sweep
    destroys the study's key after the ingest planned with it. The ingest finishes; the
    late file is a late copy of a deleted study on the next run, never an image again."""
    from dropvault.tasks import ingest as ingest_module

    home = local_home
    rng = random.Random(8)
    uid, files = samples.make_study(rng, samples.make_patient(rng, 1), 3, "MR_small.dcm")
    names = sorted(files)
    settings = Settings.load(quiet_seconds=0)
    samples.write_drop(home.drops, "fac", "early", {names[0]: files[names[0]]},
                       owners={uid: "user:eve"})  # fmt: skip
    ingest_drops(home=home, settings=settings, orphan_grace_seconds=0)
    samples.write_drop(home.drops, "fac", "late", {n: files[n] for n in names[1:]},
                       owners={uid: "user:eve"})  # fmt: skip
    row = {"request_id": "del", "owner": "user:eve", "study_uid": uid,
           "requested_at": (datetime.now(UTC) - timedelta(minutes=5)).isoformat()}  # fmt: skip
    home.manifests.put_bytes("deletions/eve.jsonl", (json.dumps(row) + "\n").encode())

    def sweep_now() -> None:
        ingest_module.FAULTS.pop("mid_encrypt", None)  # once
        t = threading.Thread(target=lambda: deletion_sweep(home=home, settings=settings))
        t.start()
        t.join(300)

    ingest_module.FAULTS["mid_encrypt"] = sweep_now
    try:
        ingest_drops(home=home, settings=settings, orphan_grace_seconds=3600)
    finally:
        ingest_module.FAULTS.pop("mid_encrypt", None)
    q = home.catalog.query
    assert q("SELECT count(*) AS n FROM tombstones")["n"][0] == 1
    assert len(home.drops.list()) > 0  # the late files wait for the next run
    ingest_drops(home=home, settings=settings, orphan_grace_seconds=0)
    deletion_sweep(home=home, settings=settings)
    assert q("SELECT count(*) AS n FROM instances WHERE study_uid = ?", [uid])["n"][0] == 0
    assert set(q("SELECT reason FROM quarantine")["reason"]) <= {"deleted_by_owner"}
    assert sources(home.drops) == [] and home.vault.list() == []
