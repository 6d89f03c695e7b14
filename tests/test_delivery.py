"""Recipient-encrypted delivery: a share with ``deliver: true`` reaches its grantee as an
age package only they can open, byte-identical to what was dropped, and every way a grant
ends takes the package out of the outbox (every version)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
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
        "k6": "applied",  # a remove with no key in force changes nothing
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


# -- what an outside review broke ---------------------------------------------------------


def _bech32(hrp: str, data: bytes) -> str:
    """BIP-173 bech32 (what age's recipients use), for hand-made keys."""
    charset = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
    acc, bits, five = 0, 0, []
    for b in data:
        acc, bits = (acc << 8) | b, bits + 8
        while bits >= 5:
            bits -= 5
            five.append((acc >> bits) & 31)
    if bits:
        five.append((acc << (5 - bits)) & 31)

    def polymod(values: list[int]) -> int:
        gen = [0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3]
        chk = 1
        for v in values:
            top = chk >> 25
            chk = (chk & 0x1FFFFFF) << 5 ^ v
            for i in range(5):
                chk ^= gen[i] if (top >> i) & 1 else 0
        return chk

    expanded = [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]
    mod = polymod([*expanded, *five, 0, 0, 0, 0, 0, 0]) ^ 1
    checksum = [(mod >> 5 * (5 - i)) & 31 for i in range(6)]
    return hrp + "1" + "".join(charset[d] for d in five + checksum)


def test_a_low_order_key_is_refused_and_cannot_stop_a_run(local_home: Home) -> None:
    home = local_home
    uid, _ = _study(home, "user:alice")
    rows = [
        req("s1", "share", "user:alice", "dr:weak", uid, -2, deliver="true"),
        req("s2", "share", "user:alice", "dr:carol", uid, -2, deliver="true"),
    ]
    write_manifest(home, "m.jsonl", rows)
    apply_share_manifests(home=home)
    zero = _bech32("age", bytes(32))  # pyrage parses it, then panics encrypting to it
    x25519.Recipient.from_str(zero)
    carol = x25519.Identity.generate()
    weak = {"request_id": "k0", "user": "dr:weak", "age_public_key": zero, "requested_at": ts(-1)}
    _register(home, "k.jsonl", [weak, _key_row("k1", "dr:carol", carol)])
    result = deliver_shares(home=home)
    assert result.summary()["delivered"] == 1 and result.waiting_for_key == 1
    assert home.catalog.query(
        "SELECT outcome FROM recipient_requests WHERE request_id LIKE 'recipients/k.jsonl#1'"
    )["outcome"].tolist() == ["rejected:bad_public_key"]


def test_an_older_key_arriving_late_does_not_come_back(local_home: Home) -> None:
    home = local_home
    old, new = x25519.Identity.generate(), x25519.Identity.generate()
    _register(home, "a.jsonl", [_key_row("k-new", "dr:carol", new, days=-0.1)])
    deliver_shares(home=home)
    _register(home, "b.jsonl", [_key_row("k-old", "dr:carol", old, days=-2)])
    deliver_shares(home=home)
    keys = home.catalog.query("SELECT public_key FROM recipient_keys WHERE retired_at IS NULL")
    assert keys["public_key"].tolist() == [str(new.to_public())]
    # A removal, then an older registration arriving late: the account stays without a key.
    remove = {"request_id": "k-rm", "action": "remove", "user": "dr:dan", "requested_at": ts(-1)}
    _register(home, "c.jsonl", [remove])
    deliver_shares(home=home)
    _register(home, "d.jsonl", [_key_row("k-dan", "dr:dan", old, days=-3)])
    deliver_shares(home=home)
    assert (
        home.catalog.query("SELECT count(*) AS n FROM recipient_keys WHERE user_id = 'dr:dan'")[
            "n"
        ].iloc[0]
        == 0
    )
    # Two requests at the same time decide by request id, whatever runs they arrive in.
    same = ts(-0.05)
    for rid, ident in (("k-z", new), ("k-a", old)):
        row = {**_key_row(rid, "dr:eve", ident), "requested_at": same}
        _register(home, f"{rid}.jsonl", [row])
        deliver_shares(home=home)
    eve = home.catalog.query(
        "SELECT public_key FROM recipient_keys WHERE user_id = 'dr:eve' AND retired_at IS NULL"
    )
    assert eve["public_key"].tolist() == [str(new.to_public())]  # k-z sorts after k-a
    outcome = home.catalog.query(
        "SELECT outcome FROM recipient_requests WHERE user_id = 'dr:carol'"
    )
    assert "rejected:superseded" in outcome["outcome"].tolist()


def test_a_grantee_account_cannot_quote_a_uid_or_the_patient(local_home: Home) -> None:
    home = local_home
    uid, files = _study(home, "user:alice")
    patient = samples.make_patient(random.Random(1), 1)  # the one _study made
    patient_id = patient.patient_id
    family, given = patient.name.split("^")[:2]
    dressed_uid = [
        f"dr:{uid}",
        "dr:" + uid.replace(".", ","),
        "dr:" + uid.replace(".", "%2E"),
        "dr:" + "".join(chr(ord(c) + 0xFEE0) if c.isdigit() else c for c in uid),  # fullwidth
    ]
    dressed_patient = [
        f"dr:{patient_id}",
        f"dr:x{patient_id}x",
        f"dr:{given}{family}".lower(),
        f"dr:{family}%5E{given}",
        f"dr:{family}/{given}",
    ]
    rows = [
        req(f"s{i}", "share", "user:alice", g, uid, -2, deliver="true")
        for i, g in enumerate(dressed_uid + dressed_patient)
    ]
    write_manifest(home, "m.jsonl", rows)
    result = apply_share_manifests(home=home)
    assert result.rejected == {
        "uid_in_name": len(dressed_uid),
        "phi_in_name": len(dressed_patient),
    }
    assert home.catalog.query("SELECT count(*) AS n FROM grants")["n"].iloc[0] == 0


def test_a_checksum_failure_delivers_nothing_and_is_counted(local_home: Home) -> None:
    home = local_home
    uid, _ = _study(home, "user:alice")
    write_manifest(
        home, "m.jsonl", [req("s1", "share", "user:alice", "dr:carol", uid, -2, deliver="true")]
    )
    apply_share_manifests(home=home)
    home.catalog.write(
        lambda con: con.execute(
            "UPDATE instances SET sha256 = repeat('0', 64) WHERE sop_instance_uid ="
            " (SELECT min(sop_instance_uid) FROM instances)"
        )
    )
    _register(home, "k.jsonl", [_key_row("k1", "dr:carol", x25519.Identity.generate())])
    result = deliver_shares(home=home)
    assert result.failed == 1 and not result.delivered
    assert home.outbox.list() == []
    assert home.catalog.query("SELECT status, withdraw_reason FROM deliveries").values.tolist() == [
        ["withdrawn", "failed"]
    ]


def test_leftovers_of_killed_writers_are_removed(
    delivered: tuple[Home, str, dict[str, bytes], x25519.Identity, str],
) -> None:
    """A package published after a revoke or deletion withdrew its row (the writer then
    died before its own check), and a partial temporary file, go on the next run."""
    home, _, _, _, name = delivered
    if not home.outbox.is_local:
        pytest.skip("temporary files are a local-disk thing (S3 uploads are all or nothing)")
    # The row was withdrawn long ago (no delivery run in between): still found.
    home.catalog.write(
        lambda con: con.execute(
            "UPDATE deliveries SET status = 'withdrawn', withdraw_reason = 'not_in_force',"
            " created_at = created_at - INTERVAL 30 HOUR"
        )
    )
    folder = posixpath.dirname(name)
    stale, fresh = f"{folder}/.tmp-{'a' * 32}", f"{folder}/.tmp-{'b' * 32}"
    home.outbox.put_bytes(stale, b"age-encryption.org/v1 partial")
    home.outbox.put_bytes(fresh, b"age-encryption.org/v1 being written")
    old = time.time() - 3600
    os.utime(home.outbox.path(stale), (old, old))
    result = deliver_shares(home=home)
    assert result.leftovers == 2
    assert [e.name for e in home.outbox.list()] == [fresh]  # a live writer's file stays


def test_a_package_that_cannot_be_removed_does_not_block_the_others(local_home: Home) -> None:
    home = local_home
    uid, _ = _study(home, "user:alice")
    rows = [
        req("s1", "share", "user:alice", "dr:aaa", uid, -2, deliver="true"),
        req("s2", "share", "user:alice", "dr:carol", uid, -2, deliver="true"),
    ]
    write_manifest(home, "m.jsonl", rows)
    apply_share_manifests(home=home)
    ids = {u: x25519.Identity.generate() for u in ("dr:aaa", "dr:carol")}
    _register(home, "k.jsonl", [_key_row(f"k-{u}", u, i) for u, i in ids.items()])
    made = {d["name"] for d in deliver_shares(home=home).delivered}
    # dr:aaa's folder is swapped for a symlink: its package cannot be deleted through it.
    aaa = next(n for n in made if home.outbox.exists(n) and "dr:aaa" in _owner_of(home, n))
    folder = Path(home.outbox.path(posixpath.dirname(aaa)))
    elsewhere = folder.parent / "elsewhere"
    folder.rename(elsewhere)
    folder.symlink_to(elsewhere)
    revokes = [
        req("r1", "revoke", "user:alice", "dr:aaa", uid, -1),
        req("r2", "revoke", "user:alice", "dr:carol", uid, -1),
    ]
    write_manifest(home, "r.jsonl", revokes)
    apply_share_manifests(home=home)  # does not raise
    carols = next(n for n in made if n != aaa)
    assert home.outbox.remaining(carols) == 0
    state = home.catalog.query("SELECT grantee, status FROM deliveries ORDER BY grantee")
    assert state.values.tolist() == [["dr:aaa", "delivered"], ["dr:carol", "withdrawn"]]
    # The next run neither raises nor leaves the grantee a way to their package's name.
    deliver_shares(home=home)
    assert not Path(home.outbox.path(aaa)).exists()


def _owner_of(home: Home, name: str) -> str:
    return str(
        home.catalog.query("SELECT grantee FROM deliveries WHERE name = ?", [name])["grantee"].iloc[
            0
        ]
    )


def test_a_replayed_key_row_is_a_duplicate_and_a_reused_id_is_refused(local_home: Home) -> None:
    home = local_home
    first, other = x25519.Identity.generate(), x25519.Identity.generate()
    row = _key_row("k1", "dr:carol", first)
    _register(home, "a.jsonl", [row])
    deliver_shares(home=home)
    _register(
        home, "b.jsonl", [row, {**_key_row("k1", "dr:carol", other), "requested_at": ts(-0.5)}]
    )
    result = deliver_shares(home=home)
    assert result.summary()["delivered"] == 0
    outcomes = home.catalog.query(
        "SELECT outcome FROM recipient_requests WHERE manifest = 'recipients/b.jsonl'"
    )["outcome"].tolist()
    assert outcomes == ["rejected:duplicate_request_id"]  # the replay itself is not re-recorded
    keys = home.catalog.query("SELECT public_key FROM recipient_keys")["public_key"].tolist()
    assert keys == [str(first.to_public())]
