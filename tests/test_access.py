"""Access under a grant: exports as a user are allowed for the owner and grantees in force
only, and every attempt is an audit row naming the study by its keyed id, never its UID."""

from __future__ import annotations

import hashlib
import json
import random
from datetime import UTC, datetime
from pathlib import Path

import pytest

from dropvault.flows.deletion import deletion_sweep
from dropvault.flows.settings import Settings
from dropvault.flows.sharing import apply_share_manifests
from dropvault.storage.home import Home
from dropvault.tasks.access import AccessRefused, access_report, export_for
from dropvault.tasks.phi import study_key
from tests.helpers import cli_env, req, seed, ts, write_manifest

pytestmark = pytest.mark.integration


@pytest.fixture
def shared(local_home: Home) -> tuple[Home, str, str]:
    """alice owns a study shared with dr:carol (in force), dr:old (expired) and dr:gone
    (revoked); returns the home, one SOP Instance UID of it, and the study UID."""
    home = local_home
    study = seed(home, {"user:alice": 1, "user:bob": 1}, random.Random(3))["user:alice"][0]
    rows = [
        req("s1", "share", "user:alice", "dr:carol", study, -3),
        req("s2", "share", "user:alice", "dr:old", study, -3, expires_at=ts(-1)),
        req("s3", "share", "user:alice", "dr:gone", study, -3),
    ]
    write_manifest(home, "m1.jsonl", rows)
    apply_share_manifests(home=home)
    write_manifest(home, "m2.jsonl", [req("r3", "revoke", "user:alice", "dr:gone", study, -2)])
    apply_share_manifests(home=home)
    sop = home.catalog.query("SELECT sop_instance_uid FROM instances WHERE study_uid = ?", [study])
    return home, str(sop["sop_instance_uid"].iloc[0]), study


def _audits(home: Home) -> list[tuple[str, str, dict[str, object]]]:
    rows = home.catalog.query(
        "SELECT actor, subject, detail FROM audit_log WHERE action = 'access_export'"
        " ORDER BY occurred_at"
    )
    return [(a, s, json.loads(d)) for a, s, d in rows.itertuples(index=False)]


def test_the_owner_and_a_grantee_in_force_may_export(
    shared: tuple[Home, str, str], tmp_path: Path
) -> None:
    home, sop, study = shared
    want = home.catalog.query("SELECT sha256 FROM instances WHERE sop_instance_uid = ?", [sop])
    for user, via in (("user:alice", "owner"), ("dr:carol", "grant:study")):
        out = tmp_path / f"{user.replace(':', '-')}.dcm"
        result = export_for(home, user, sop, out, purpose="second opinion")
        assert result["via"] == via
        assert hashlib.sha256(out.read_bytes()).hexdigest() == want["sha256"].iloc[0]
    audits = _audits(home)
    assert [(a, d["outcome"], d["via"]) for a, _, d in audits] == [
        ("user:alice", "allowed", "owner"),
        ("dr:carol", "allowed", "grant:study"),
    ]
    assert {s for _, s, _ in audits} == {study_key(home.pepper, study)}
    assert all(study not in json.dumps(d) and sop not in json.dumps(d) for *_, d in audits)
    assert all("second opinion" not in json.dumps(d) for *_, d in audits)  # sealed


@pytest.mark.parametrize("user", ["dr:old", "dr:gone", "dr:stranger", "user:bob"])
def test_expired_revoked_and_unknown_users_are_refused_and_audited(
    shared: tuple[Home, str, str], tmp_path: Path, user: str
) -> None:
    home, sop, study = shared
    out = tmp_path / "out" / "img.dcm"
    with pytest.raises(AccessRefused) as refused:
        export_for(home, user, sop, out)
    assert not out.parent.exists()  # nothing written, not even the folder
    assert sop not in str(refused.value) and study not in str(refused.value)
    [(actor, subject, detail)] = _audits(home)
    assert (actor, detail["outcome"]) == (user, "refused")
    assert subject == study_key(home.pepper, study)


def test_an_unknown_image_is_refused_like_a_forbidden_one(
    shared: tuple[Home, str, str], tmp_path: Path
) -> None:
    home, _, _ = shared
    with pytest.raises(AccessRefused, match="may not access this image"):
        export_for(home, "dr:carol", "1.2.3.4.5.6.7", tmp_path / "x.dcm")
    [(actor, subject, detail)] = _audits(home)
    assert (actor, subject, detail["outcome"]) == ("dr:carol", "unknown", "refused")


def test_a_purpose_quoting_a_uid_is_refused(shared: tuple[Home, str, str], tmp_path: Path) -> None:
    home, sop, study = shared
    with pytest.raises(AccessRefused, match="must not quote a UID"):
        export_for(home, "dr:carol", sop, tmp_path / "x.dcm", purpose=f"about {study}")
    assert _audits(home) == []


def test_deleted_and_archived_studies(shared: tuple[Home, str, str], tmp_path: Path) -> None:
    """Archived: the owner keeps access, a grantee loses it. Deleted: nobody has any."""
    home, sop, study = shared
    requested = datetime.now(UTC).isoformat()
    row = {"request_id": "del-1", "owner": "user:alice", "study_uid": study,
           "requested_at": requested, "keep_archive": True}  # fmt: skip
    home.manifests.put_bytes("deletions/d1.jsonl", (json.dumps(row) + "\n").encode())
    deletion_sweep(home=home, settings=Settings.load())
    export_for(home, "user:alice", sop, tmp_path / "owner.dcm")
    with pytest.raises(AccessRefused):
        export_for(home, "dr:carol", sop, tmp_path / "grantee.dcm")
    row = {**row, "request_id": "del-2", "keep_archive": False}
    home.manifests.put_bytes("deletions/d2.jsonl", (json.dumps(row) + "\n").encode())
    deletion_sweep(home=home, settings=Settings.load())
    with pytest.raises(AccessRefused):
        export_for(home, "user:alice", sop, tmp_path / "after.dcm")
    outcomes = [(a, d["outcome"]) for a, _, d in _audits(home)]
    assert outcomes == [
        ("user:alice", "allowed"),
        ("dr:carol", "refused"),
        ("user:alice", "refused"),
    ]


def test_the_cli_export_as_a_user(shared: tuple[Home, str, str], tmp_path: Path) -> None:
    import subprocess

    from tests.helpers import EXE

    home, sop, _ = shared
    env = cli_env(tmp_path / "home")  # the local_home fixture's
    ok = subprocess.run(  # noqa: S603 - the project's own CLI
        [EXE, "export", sop, "--out", str(tmp_path / "a.dcm"), "--as", "dr:carol"],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    no = subprocess.run(  # noqa: S603 - the project's own CLI
        [EXE, "export", sop, "--out", str(tmp_path / "b.dcm"), "--as", "dr:gone"],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert no.returncode == 1 and no.stderr.startswith("error:")
    # One line of ours (Prefect's event client may add its own "still processing" line).
    assert "Traceback" not in no.stderr and sop not in no.stderr
    assert not (tmp_path / "b.dcm").exists()


def test_the_owner_reads_who_accessed_their_records(
    shared: tuple[Home, str, str], tmp_path: Path
) -> None:
    home, sop, study = shared
    export_for(home, "dr:carol", sop, tmp_path / "a.dcm", purpose="second opinion")
    with pytest.raises(AccessRefused):
        export_for(home, "dr:gone", sop, tmp_path / "b.dcm")
    report = access_report(home, "user:alice")
    kinds = list(zip(report["kind"], report["who"], report["outcome"], strict=True))
    assert ("export", "dr:carol", "allowed") in kinds and ("export", "dr:gone", "refused") in kinds
    grants = {(w, o) for k, w, o in kinds if k == "grant"}
    assert grants == {("dr:carol", "active"), ("dr:old", "expired"), ("dr:gone", "revoked")}
    assert set(report["study_uid"]) == {study}  # alice's own study only
    mine = report[report["kind"] == "export"]
    assert list(mine["why"]) == ["second opinion", ""]
    # bob's report does not see alice's accesses
    assert access_report(home, "user:bob").empty
    later = access_report(home, "user:alice", since=datetime(2100, 1, 1, tzinfo=UTC))
    assert set(later["kind"]) == {"grant"} and set(later["outcome"]) == {"active"}


@pytest.mark.parametrize("user", ["", "dr:carol\nuser:alice allowed", "x" * 201])
def test_an_unprintable_or_empty_user_is_refused_unlogged(
    shared: tuple[Home, str, str], tmp_path: Path, user: str
) -> None:
    home, sop, _ = shared
    with pytest.raises(AccessRefused, match="a user is required"):
        export_for(home, user, sop, tmp_path / "x.dcm")
    assert _audits(home) == []
