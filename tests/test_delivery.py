"""Recipient-encrypted delivery: a share with ``deliver: true`` reaches its grantee as an
age package only they can open, byte-identical to what was dropped, and every way a grant
ends takes the package out of the outbox (every version)."""

from __future__ import annotations

import hashlib
import io
import json
import random
import subprocess
import sys
import tarfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pyrage import DecryptError, decrypt, x25519

from dropvault.flows.deletion import deletion_sweep
from dropvault.flows.delivery import deliver_shares
from dropvault.flows.settings import Settings
from dropvault.flows.sharing import apply_share_manifests, report_wrong_access
from dropvault.storage.home import Home
from dropvault.tasks import samples
from dropvault.tasks.access import access_report
from dropvault.tasks.delivery import deliver_due, deliveries_for
from dropvault.tasks.drops import scan_drops
from dropvault.tasks.incidents import file_incident_request
from dropvault.tasks.ingest import ingest_batch
from dropvault.tasks.phi import study_key
from tests.helpers import req, ts, write_manifest


def _study(home: Home, owner: str, n: int = 3, seed: int = 1) -> tuple[str, dict[str, bytes]]:
    """Ingest one study of ``n`` images for ``owner``; returns its UID and dropped files."""
    rng = random.Random(seed)
    uid, files = samples.make_study(rng, samples.make_patient(rng, seed), n, "MR_small.dcm")
    samples.write_drop(home.drops, "fac", f"d{seed}", files, owners={uid: owner})
    home.catalog.migrate()
    for drop in scan_drops(home.drops, home.pepper, time.time(), 0, 86400):
        ingest_batch(home, [(drop, f) for f in drop.files], max_file_bytes=10**9)
    return uid, files


def _register(home: Home, name: str, rows: list[dict[str, str]]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    home.manifests.put_bytes(f"recipients/{name}", text.encode())


def _key_row(rid: str, user: str, ident: x25519.Identity, days: float = -1) -> dict[str, str]:
    return {
        "request_id": rid,
        "user": user,
        "age_public_key": str(ident.to_public()),
        "requested_at": ts(days),
    }


def _open(home: Home, name: str, ident: x25519.Identity) -> dict[str, bytes]:
    out = {}
    plain = io.BytesIO(decrypt(home.outbox.read_bytes(name), [ident]))
    with tarfile.open(fileobj=plain) as tar:
        for member in tar.getmembers():
            fh = tar.extractfile(member)
            assert fh is not None
            out[member.name] = fh.read()
    return out


@pytest.fixture
def delivered(home: Home) -> tuple[Home, str, dict[str, bytes], x25519.Identity, str]:
    """alice's study shared with dr:carol for delivery, carol's key registered, one run."""
    uid, files = _study(home, "user:alice")
    write_manifest(
        home, "m1.jsonl", [req("s1", "share", "user:alice", "dr:carol", uid, -2, deliver="true")]
    )
    apply_share_manifests(home=home)
    carol = x25519.Identity.generate()
    _register(home, "k1.jsonl", [_key_row("k1", "dr:carol", carol)])
    result = deliver_shares(home=home)
    assert result.summary()["delivered"] == 1
    return home, uid, files, carol, result.delivered[0]["name"]


def test_a_package_decrypts_to_the_dropped_files(
    delivered: tuple[Home, str, dict[str, bytes], x25519.Identity, str],
) -> None:
    home, uid, files, carol, name = delivered
    opened = _open(home, name, carol)
    images = {k: v for k, v in opened.items() if k.startswith("images/")}
    assert sorted(images.values()) == sorted(files.values())  # byte for byte
    index = json.loads(opened["index.json"])
    assert {f["name"] for f in index["files"]} == set(images)
    # No UID or patient in the package's names, its index or its object name.
    text = json.dumps(index) + name + " ".join(opened)
    assert uid not in text and "MRN" not in text
    assert (
        home.catalog.query(
            "SELECT count(*) AS n FROM deliveries WHERE grantee = 'dr:carol' AND study_uid = ?"
            " AND status = 'delivered' AND files = 3",
            [uid],
        )["n"].iloc[0]
        == 1
    )
    assert list(deliveries_for(home.catalog, "dr:carol")["name"]) == [name]
    # The delivery is an audit row naming the study by its keyed id, and in alice's report.
    audit = home.catalog.query("SELECT actor, subject FROM audit_log WHERE action = 'deliver'")
    assert list(audit.itertuples(index=False, name=None)) == [
        ("dr:carol", study_key(home.pepper, uid))
    ]
    report = access_report(home, "user:alice")
    assert ("delivery", "dr:carol", "delivered") in set(
        zip(report["kind"], report["who"], report["outcome"], strict=True)
    )
    # A second run delivers nothing new.
    assert deliver_shares(home=home).summary()["delivered"] == 0


def test_no_other_identity_can_decrypt(
    delivered: tuple[Home, str, dict[str, bytes], x25519.Identity, str],
) -> None:
    home, _, _, _, name = delivered
    with pytest.raises(DecryptError):
        decrypt(home.outbox.read_bytes(name), [x25519.Identity.generate()])


def test_a_revoke_removes_the_package_at_once(
    delivered: tuple[Home, str, dict[str, bytes], x25519.Identity, str],
) -> None:
    home, uid, _, _, name = delivered
    write_manifest(home, "m2.jsonl", [req("r1", "revoke", "user:alice", "dr:carol", uid, -1)])
    apply_share_manifests(home=home)
    assert home.outbox.remaining(name) == 0
    assert home.catalog.query("SELECT status, withdraw_reason FROM deliveries").values.tolist() == [
        ["withdrawn", "not_in_force"]
    ]
    assert deliver_shares(home=home).summary()["delivered"] == 0  # not sent again


def test_an_incident_and_a_deletion_remove_packages(local_home: Home) -> None:
    """dr:carol reports seeing study a by mistake (its grant is revoked, its package goes);
    then alice deletes study b (its package goes, verified by the sweep)."""
    home = local_home
    carol = x25519.Identity.generate()
    _register(home, "k1.jsonl", [_key_row("k1", "dr:carol", carol)])
    a, _ = _study(home, "user:alice", seed=1)
    b, _ = _study(home, "user:alice", seed=2)
    rows = [
        req("s1", "share", "user:alice", "dr:carol", a, -2, deliver="true"),
        req("s2", "share", "user:alice", "dr:carol", b, -2, deliver="true"),
    ]
    write_manifest(home, "m1.jsonl", rows)
    apply_share_manifests(home=home)
    made = {d["name"] for d in deliver_shares(home=home).delivered}
    assert len(made) == 2
    filed = file_incident_request(home.manifests, "dr:carol", a, datetime.now(UTC))
    assert len(report_wrong_access(filed, home=home).revoked) == 1
    made = {n for n in made if home.outbox.remaining(n)}
    assert len(made) == 1
    # Deleting study b: its package goes with it, and the sweep verifies that.
    deletion = {"request_id": "del-1", "owner": "user:alice", "study_uid": b}
    home.manifests.put_bytes(
        "deletions/d.jsonl", (json.dumps({**deletion, "requested_at": ts(-0.1)}) + "\n").encode()
    )
    sweep = deletion_sweep(home=home, settings=Settings.load())
    assert sweep.summary()["all_verified"]
    assert not [n for n in made if home.outbox.remaining(n)]
    assert (
        home.catalog.query("SELECT count(*) AS n FROM deliveries WHERE study_uid = ?", [b])[
            "n"
        ].iloc[0]
        == 0
    )  # the row keeps the tombstone key, not the UID
    # Nothing left in the outbox that names or holds study b.
    assert home.outbox.list() == []


def test_expiry_and_a_key_change(
    delivered: tuple[Home, str, dict[str, bytes], x25519.Identity, str],
) -> None:
    home, uid, files, carol, name = delivered
    # A new key: the old package goes, a new one for the new key only arrives.
    carol2 = x25519.Identity.generate()
    _register(home, "k2.jsonl", [_key_row("k2", "dr:carol", carol2, days=-0.5)])
    result = deliver_shares(home=home)
    assert result.summary()["withdrawn_by_reason"] == {"key_changed": 1}
    assert home.outbox.remaining(name) == 0
    new = result.delivered[0]["name"]
    with pytest.raises(DecryptError):
        _open(home, new, carol)
    assert sorted(v for k, v in _open(home, new, carol2).items() if k != "index.json") == sorted(
        files.values()
    )
    changed = home.catalog.query(
        "SELECT detail FROM audit_log WHERE action = 'recipient_key_changed'"
    )
    assert json.loads(changed["detail"].iloc[0])["version"] == 2
    # Past its expiry the package is removed, and not built again for the same grant.
    later = datetime.now(UTC) + timedelta(days=8)
    gone = deliver_due(home, later)
    assert gone.withdrawn == {"expired": 1} and not gone.delivered
    assert home.outbox.remaining(new) == 0


def test_bad_recipient_rows_are_rejected_and_good_ones_apply(local_home: Home) -> None:
    home = local_home
    good = x25519.Identity.generate()
    rows = [
        _key_row("k1", "dr:good", good),
        {**_key_row("k2", "dr:bad", good), "age_public_key": "age1notakey"},
        {**_key_row("k3", "dr:ssh", good), "age_public_key": "ssh-ed25519 AAAAC3Nza"},
        {**_key_row("k4", "1.2.840.10008.1", good)},  # an account quoting a UID
        {"request_id": "k5", "user": "dr:none", "requested_at": ts(-1)},  # no key
        {"request_id": "k6", "action": "remove", "user": "dr:nobody", "requested_at": ts(-1)},
    ]
    _register(home, "k.jsonl", rows)
    result = deliver_shares(home=home)
    assert result.waiting_for_key == 0
    outcomes = dict(
        home.catalog.query("SELECT request_id, outcome FROM recipient_requests").values.tolist()
    )
    assert outcomes == {
        "k1": "applied",
        "recipients/k.jsonl#2": "rejected:bad_public_key",
        "recipients/k.jsonl#3": "rejected:bad_public_key",
        "recipients/k.jsonl#4": "rejected:uid_in_name",
        "recipients/k.jsonl#5": "rejected:missing_field",
        "recipients/k.jsonl#6": "rejected:no_recipient_key",
    }
    assert home.catalog.query("SELECT user_id FROM recipient_keys")["user_id"].tolist() == [
        "dr:good"
    ]
    assert home.manifests.exists("recipients/processed/k.jsonl")


def test_a_grant_waits_for_its_grantees_key(local_home: Home) -> None:
    home = local_home
    uid, _ = _study(home, "user:alice")
    write_manifest(
        home, "m1.jsonl", [req("s1", "share", "user:alice", "dr:dan", uid, -2, deliver="yes")]
    )
    apply_share_manifests(home=home)
    first = deliver_shares(home=home)
    assert first.waiting_for_key == 1 and not first.delivered
    dan = x25519.Identity.generate()
    _register(home, "k.jsonl", [_key_row("k1", "dr:dan", dan)])
    assert deliver_shares(home=home).summary()["delivered"] == 1


def test_deliver_must_be_a_flag_on_a_share(local_home: Home) -> None:
    home = local_home
    uid, _ = _study(home, "user:alice")
    rows = [
        req("s1", "share", "user:alice", "dr:x", uid, -2, deliver="maybe"),
        req("s2", "revoke", "user:alice", "dr:x", uid, -1, deliver="true"),
        req("s3", "share", "user:alice", "dr:y", uid, -1),  # no deliver: nothing sent
    ]
    write_manifest(home, "m1.jsonl", rows)
    result = apply_share_manifests(home=home)
    assert result.rejected == {"bad_deliver": 2}
    assert home.catalog.query("SELECT count(*) AS n FROM delivery_requests")["n"].iloc[0] == 0


PACKAGE_CHILD = """
import resource, sys, time
from dropvault.storage.home import Home
from dropvault.tasks.delivery import write_package
from pyrage import x25519
home = Home.local(sys.argv[1])
uid = home.catalog.query("SELECT study_uid FROM studies")["study_uid"].iloc[0]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
files, size = write_package(home, "p/pkg.tar.age", uid, sys.argv[2])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(size, (after - before) // 1024)
"""


@pytest.mark.integration
def test_memory_stays_bounded_for_a_300_mb_study(tmp_path: Path) -> None:
    home = Home.init(tmp_path / "home")
    folder = tmp_path / "home" / "drops" / "fac" / "big"
    folder.mkdir(parents=True)
    rng = random.Random(7)
    uid = "1.2.826.0.1.3680043.8.498.1"
    with (folder / "big.dcm").open("wb") as fh:
        samples.write_multiframe(fh, samples.make_patient(rng, 1), uid, uid + ".1", 600)
    # No manifest: the owner comes from a manifest, so write one with its checksum.
    data_size = (folder / "big.dcm").stat().st_size
    digest = hashlib.sha256()
    with (folder / "big.dcm").open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    doc = {
        "files": [{"path": "big.dcm", "size": data_size, "sha256": digest.hexdigest()}],
        "owners": {uid: "user:alice"},
    }
    (folder / "manifest.json").write_text(json.dumps(doc))
    home.catalog.migrate()
    for drop in scan_drops(home.drops, home.pepper, time.time(), 0, 86400):
        ingest_batch(home, [(drop, f) for f in drop.files], max_file_bytes=10**10)
    key = x25519.Identity.generate()
    out = subprocess.run(
        [sys.executable, "-c", PACKAGE_CHILD, str(tmp_path / "home"), str(key.to_public())],
        capture_output=True,
        text=True,
        check=True,
    )
    size, grew_mb = (int(v) for v in out.stdout.split())
    assert size > 300 * 10**6
    assert grew_mb < 64, f"peak RSS grew {grew_mb} MB while packaging {size} bytes"
