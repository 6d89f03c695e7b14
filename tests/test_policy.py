"""Policy-change notices: a material version reaches every owner, every grantee in force
or recently ended, and the mailer's whole list, each account once across reruns."""

from __future__ import annotations

import hashlib
import json
import random
from datetime import UTC, datetime, timedelta

import pytest

from dropvault.flows.policy import policy_notices
from dropvault.flows.sharing import apply_share_manifests
from dropvault.storage.home import Home
from dropvault.tasks.policy import policy_versions, send_notices
from tests.helpers import req, seed, write_manifest

TEXT = hashlib.sha256(b"the policy's text").hexdigest()


def _publish(home: Home, name: str, **doc: object) -> None:
    home.manifests.put_bytes(f"policy/{name}", json.dumps(doc).encode())


def _version(version: str, material: bool, days: int = 30) -> dict[str, object]:
    effective = (datetime.now(UTC) + timedelta(days=days)).date().isoformat()
    return {
        "version": version,
        "effective_on": effective,
        "material": material,
        "text_sha256": TEXT,
    }


def _batches(home: Home, version: str) -> list[list[dict[str, object]]]:
    out = []
    for entry in sorted(home.outbox.list(f"policy/{version}"), key=lambda e: e.mtime):
        lines = home.outbox.read_bytes(entry.name).decode().splitlines()
        out.append([json.loads(line) for line in lines])
    return out


@pytest.fixture
def people(local_home: Home) -> Home:
    """Owners user:alice and user:bob; alice's grants: dr:carol in force, dr:recent revoked
    10 days ago, dr:old revoked 100 days ago."""
    home = local_home
    studies = seed(home, {"user:alice": 1, "user:bob": 1}, random.Random(5))
    study = studies["user:alice"][0]
    rows = [
        req("s1", "share", "user:alice", "dr:carol", study, -200),
        req("s2", "share", "user:alice", "dr:recent", study, -200),
        req("s3", "share", "user:alice", "dr:old", study, -200),
        req("r2", "revoke", "user:alice", "dr:recent", study, -10),
        req("r3", "revoke", "user:alice", "dr:old", study, -100),
    ]
    write_manifest(home, "m.jsonl", rows)
    apply_share_manifests(home=home)
    return home


def test_a_material_version_notifies_each_account_once(people: Home) -> None:
    home = people
    _publish(home, "2026-12.json", **_version("2026-12", True))
    first = policy_notices(home=home)
    assert first.notified == {"2026-12": 4}
    notified = home.catalog.query(
        "SELECT account, role FROM policy_notices WHERE version = '2026-12' ORDER BY account"
    ).values.tolist()
    assert notified == [
        ["dr:carol", "grantee"],
        ["dr:recent", "grantee"],
        ["user:alice", "owner"],
        ["user:bob", "owner"],
    ]
    [batch] = _batches(home, "2026-12")
    assert batch[0]["version"] == "2026-12" and batch[0]["text_sha256"] == TEXT
    # The mailer's list, unsubscribed people included: the suppression list does not apply.
    assert batch[1]["audience"] == "newsletter_subscribers" and batch[1]["include_unsubscribed"]
    assert {r["account"] for r in batch[2:]} == {"dr:carol", "dr:recent", "user:alice", "user:bob"}
    # Reruns add nobody twice and write no new batch.
    for _ in range(2):
        again = send_notices(home)
        assert again.notified == {} and again.batches == []
    assert len(_batches(home, "2026-12")) == 1
    # An owner who arrives before the version takes effect is told, alone, once.
    seed(home, {"user:dan": 1}, random.Random(9))
    later = send_notices(home)
    assert later.notified == {"2026-12": 1}
    batches = _batches(home, "2026-12")
    assert [r.get("account") for r in batches[1][1:]] == ["user:dan"]
    counts = policy_versions(home.catalog).iloc[0]
    assert (counts["notified"], counts["owners"], counts["grantees"], counts["batches"]) == (
        5,
        3,
        2,
        2,
    )


def test_a_non_material_version_notifies_nobody(people: Home) -> None:
    home = people
    _publish(home, "2026-12a.json", **_version("2026-12a", False))
    result = send_notices(home)
    assert result.versions == ["2026-12a"] and result.notified == {} and result.batches == []
    assert home.catalog.query("SELECT count(*) AS n FROM policy_notices")["n"].iloc[0] == 0
    assert home.outbox.list("policy") == []


def test_bad_policy_files_are_rejected_and_good_ones_apply(people: Home) -> None:
    home = people
    _publish(home, "good.json", **_version("v1", True))
    home.manifests.put_bytes("policy/broken.json", b"{not json")
    _publish(home, "string-flag.json", **{**_version("v2", True), "material": "true"})
    _publish(home, "bad-sha.json", **{**_version("v3", True), "text_sha256": "abc"})
    _publish(home, "bad-name.json", **_version("../v4", True))
    _publish(home, "no-date.json", **{**_version("v5", True), "effective_on": "soon"})
    result = send_notices(home)
    assert result.versions == ["v1"]
    assert result.rejected == {
        "malformed": 1,
        "bad_material": 1,
        "bad_sha256": 1,
        "bad_version": 1,
        "bad_timestamp": 1,
    }
    # A published version cannot be changed afterwards.
    _publish(home, "good-edited.json", **{**_version("v1", False)})
    assert send_notices(home).rejected["version_conflict"] == 1
    assert policy_versions(home.catalog)["material"].tolist() == [True]


def test_a_batch_lost_before_it_was_written_is_written_by_the_next_run(people: Home) -> None:
    home = people
    _publish(home, "v.json", **_version("v9", True))
    send_notices(home)
    [batch] = _batches(home, "v9")
    # As if the run died after the notices committed and before the file was written.
    for entry in home.outbox.list("policy/v9"):
        home.outbox.delete(entry.name)
    home.catalog.write(lambda con: con.execute("UPDATE policy_batches SET written_at = NULL"))
    assert send_notices(home).notified == {}
    assert _batches(home, "v9") == [batch]


def test_an_oversized_or_uid_named_policy_file_is_refused_unread(people: Home) -> None:
    home = people
    home.manifests.put_bytes("policy/huge.json", b" " * (64 * 1024 + 1))
    _publish(home, "uid.json", **_version("1.2.840.10008", True))
    _publish(home, "fine.json", **_version("v10", True))
    result = send_notices(home)
    assert result.versions == ["v10"]
    assert result.rejected == {"too_large": 1, "bad_version": 1}
