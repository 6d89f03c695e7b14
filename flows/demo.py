"""``dropvault demo``: fill a home with demo drops and run every flow on it.

The drops come from 3 facilities and 26 patients, built from pydicom's bundled
samples with rewritten patient identities and UIDs; a few files are bad on
purpose (not DICOM, truncated, missing a UID, a UID conflict, a short
manifest) so the quarantine has something to show. Then share, revoke and
disclose manifests (with a few bad rows) are applied; two grantees register age keys and
half the shares ask for delivery, so packages reach the outbox; one delivered grant is
revoked (its package goes); a material policy version is published and its notices
computed. The grantees' private keys are written under ``{home}/demo-grantee-keys/`` (0600)
so a package can be opened with any age tool.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd

from dropvault.flows.beacons import compile_beacon_stats
from dropvault.flows.deletion import deletion_sweep
from dropvault.flows.delivery import deliver_shares
from dropvault.flows.ingest import ingest_drops
from dropvault.flows.policy import policy_notices
from dropvault.flows.settings import Settings
from dropvault.flows.sharing import apply_share_manifests
from dropvault.storage.errors import TerminalError
from dropvault.storage.home import LOCATIONS, Home, HomeRecord
from dropvault.tasks import samples
from dropvault.tasks.deletion import deletion_sla
from dropvault.tasks.sharing import access_list
from dropvault.tasks.status import table_counts

FACILITIES = ("st-olav", "north-imaging", "harbor-clinic")
ARCHIVE_FACILITY = "lakeside-pacs"  # sends ZIP files
CD_FACILITY = "county-cd-desk"  # copies patients' image CDs
# Written into a home the demo made: ``--reset`` removes only such a home.
DEMO_MARK = "made-by-dropvault-demo"
# Tables whose rows mean the home holds data (a new home has only its first catalog write).
DATA_TABLES = ("drops", "instances", "quarantine", "grants", "beacon_days", "deletion_requests")


class DemoRefused(TerminalError, RuntimeError):
    """The demo would stack on a home that holds data, or ``--reset`` would remove one the
    demo did not make."""


def _mark_text(record: HomeRecord) -> str:
    """The mark names the home it was made with (a mark copied or planted into another
    home does not match that home's record)."""
    return f"made by `dropvault demo`: {record.created_at} {record.keystore_id}\n"


def _made_by_demo(root: Path) -> bool:
    record = HomeRecord.read(root)
    try:
        text = (root / DEMO_MARK).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return record is not None and text == _mark_text(record)


def prepare_demo_home(settings: Settings, reset: bool) -> None:
    """Refuse to run the demo on a home that holds data, unless ``reset`` and the demo made
    it: then empty it (Prefect's own folder stays, the embedded server may be using it)."""
    root = settings.home.resolve()
    if HomeRecord.read(root) is None:
        return
    counts = table_counts(settings.reader_catalog())
    held = {t: counts.get(t, 0) for t in DATA_TABLES if counts.get(t, 0)}
    if not held:
        return
    if not reset:
        summary = ", ".join(f"{t}={n}" for t, n in held.items())
        raise DemoRefused(
            f"{root} already holds data ({summary}); `dropvault demo --reset` starts the demo"
            " over in a home the demo made"
        )
    outside = [
        f"DROPVAULT_{n.upper()}_URL"
        for n in (*LOCATIONS, "catalog")
        if getattr(settings, f"{n}_url")
    ]
    if not _made_by_demo(root) or outside:
        why = f"it uses {', '.join(outside)}" if outside else "the demo did not make it"
        raise DemoRefused(f"--reset removes only a home the demo made; {root}: {why}")
    for child in root.iterdir():
        if child.name == "prefect":
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


@dataclass
class DemoSummary:
    home: str
    drops_written: int
    files_written: int
    ingest: dict[str, Any]
    tables: dict[str, int] = field(default_factory=dict)
    quarantine: dict[str, int] = field(default_factory=dict)
    sharing: dict[str, Any] = field(default_factory=dict)
    access_owner: str = ""
    access: pd.DataFrame = field(default_factory=pd.DataFrame)
    deletion: dict[str, Any] = field(default_factory=dict)
    sla: pd.DataFrame = field(default_factory=pd.DataFrame)
    beacons: dict[str, Any] = field(default_factory=dict)
    delivery: dict[str, Any] = field(default_factory=dict)
    revoked_package_gone: bool = False
    policy: dict[str, Any] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [f"dropvault demo home: {self.home}"]
        out.append(f"wrote {self.drops_written} drops, {self.files_written} files")
        ing = self.ingest
        out.append(
            f"ingest: {ing['ingested']} ingested, {ing['duplicates']} duplicates, "
            f"{ing['quarantined']} quarantined, {ing['bytes']} bytes in {ing['seconds']} s"
        )
        out.append("catalog rows: " + ", ".join(f"{t}={n}" for t, n in self.tables.items()))
        out.append(
            "quarantine by reason: "
            + (", ".join(f"{r}={n}" for r, n in sorted(self.quarantine.items())) or "none")
        )
        sh = self.sharing
        out.append(
            f"sharing: {sh.get('applied', 0)} applied, {sh.get('rejected', 0)} rejected "
            f"{sh.get('rejected_by_reason', {})}, {sh.get('disclosures', 0)} disclosures"
        )
        dv = self.delivery
        out.append(
            f"delivery: {dv.get('delivered', 0)} packages ({dv.get('files', 0)} images) "
            f"age-encrypted to their grantees in the outbox; one grant revoked, its package "
            f"{'removed' if self.revoked_package_gone else 'STILL THERE'} "
            "(see: dropvault deliveries dr:house)"
        )
        pol = self.policy
        out.append(
            f"policy: {pol.get('versions_recorded', 0)} version(s) recorded, "
            f"{pol.get('accounts_notified', 0)} accounts to notify in "
            f"{pol.get('batches_written', 0)} batch(es) (see: dropvault policy-notices)"
        )
        out.append(f"access list of {self.access_owner}:")
        view = self.access[["grantee", "scope", "status", "granted_at", "expires_at"]]
        out += ["  " + line for line in view.to_string(index=False).splitlines()]
        d = self.deletion
        out.append(
            f"deletion sweep: {d.get('studies_deleted', 0)} studies deleted, "
            f"{d.get('studies_archived', 0)} archived, verified={d.get('all_verified')}, "
            f"{d.get('requests_rejected', 0)} request(s) rejected, "
            f"catalog compaction: {d.get('catalog_compaction')}"
        )
        out.append("deletion SLA:")
        sla = self.sla[["request_id", "requested_at", "due_at", "completed_at", "sla_state"]]
        out += ["  " + line for line in sla.to_string(index=False).splitlines()]
        b = self.beacons
        out.append(
            f"beacons: {b.get('days')} days, {b.get('lines')} hits, {b.get('malformed')} malformed,"
            f" {b.get('scrubbed')} scrubbed, {b.get('bots')} bots; {b.get('cells')} cells, "
            f"{b.get('suppressed')} suppressed (see: dropvault beacons --day {b.get('first_day')})"
        )
        return out

    def _repr_html_(self) -> str:
        return "<pre>" + "\n".join(self.lines()) + "</pre>"


def write_demo_drops(
    home: Home, seed: int = 7, patients: int = 24
) -> tuple[int, int, list[tuple[str, str]]]:
    """Write the demo drops; returns ``(drops, files, [(owner, study_uid), ...])``.

    Odd-numbered patients have an account named in the manifest (``user:demo-NNN``); the
    others own their studies through their pseudonym.
    """
    rng = random.Random(seed)  # noqa: S311 - demo data, not secrets
    drops = files = 0
    owned: list[tuple[str, str]] = []
    for index in range(patients):
        facility = FACILITIES[index % len(FACILITIES)]
        patient = samples.make_patient(rng, index)
        study_uid, study = samples.make_study(rng, patient, rng.randint(2, 4))
        owners = {study_uid: f"user:demo-{index:03d}"} if index % 2 else {}
        owned += list(owners.items())
        samples.write_drop(home.drops, facility, f"drop-{index:03d}", study, owners=owners)
        drops += 1
        files += len(study)
    # Bad input, each kind once, in one drop per facility.
    patient = samples.make_patient(rng, 999)
    study_uid, study = samples.make_study(rng, patient, 2, "CT_small.dcm")
    good = next(iter(study.values()))
    bad = {
        "notes.txt": samples.not_dicom(),
        "cut.dcm": samples.truncated(good),
        "no-uid.dcm": samples.without(good, "SOPInstanceUID"),
    }
    samples.write_drop(home.drops, FACILITIES[0], "drop-bad", {**study, **bad})
    # The same SOP Instance UID with other content: a conflict.
    conflict = samples.with_uid(good, samples.sop_uid(good), tweak=b"rescanned")
    samples.write_drop(home.drops, FACILITIES[1], "drop-conflict", {"again.dcm": conflict})
    # No manifest: ingested once quiet.
    patient = samples.make_patient(rng, 1000)
    _, study = samples.make_study(rng, patient, 2, "MR_small.dcm")
    samples.write_drop(home.drops, FACILITIES[2], "drop-nomanifest", study, manifest=False)
    archived, cd = write_demo_archive_and_cd(home, rng)
    return drops + 5, files + len(bad) + 2 + 1 + 2 + archived + cd, [(o, s) for s, o in owned]


def write_demo_archive_and_cd(home: Home, rng: random.Random) -> tuple[int, int]:
    """One facility sends its PACS export as ZIP files (one per study, listed in a
    manifest), and one copies a patient's image CD (pydicom's ``dicomdirtests``: a DICOMDIR,
    images without extensions, a README, ``autorun.inf`` and a viewer). Returns the files
    in each."""
    zips = {}
    for i in range(3):
        patient = samples.make_patient(rng, 2000 + i)
        _, study = samples.make_study(rng, patient, 3)
        zips[f"export-{i + 1}.zip"] = samples.zip_bytes(study)
    samples.write_drop(home.drops, ARCHIVE_FACILITY, "pacs-export-0001", zips)
    cd = samples.cd_files()
    samples.write_drop(home.drops, CD_FACILITY, "cd-0001", cd, manifest=False)
    return len(zips), len(cd)


def write_demo_share_manifests(home: Home, owned: list[tuple[str, str]]) -> int:
    """Share, revoke and disclose requests for the demo owners, with a few bad rows."""
    now = datetime.now(UTC)

    def at(days: float) -> str:
        return (now - timedelta(days=days)).isoformat()

    rows: list[dict[str, str]] = []
    for i, (owner, study) in enumerate(owned):
        share = _share(f"demo-s{i}", "share", owner, "dr:house", study, at(30 - i))
        rows.append({**share, "deliver": "true"} if i % 2 == 0 else share)
        if i % 3 == 0:
            rows.append(_share(f"demo-w{i}", "share", owner, "clinic:north", "*", at(20)))
        if i % 4 == 1:
            rows.append(_share(f"demo-r{i}", "revoke", owner, "dr:house", study, at(5)))
        if i % 5 == 2:
            rows.append(
                {
                    **_share(f"demo-d{i}", "disclose", owner, "court:oslo", study, at(40)),
                    "purpose": "court order",
                }
            )
    owner, study = owned[0]
    rows += [
        _share("demo-bad-1", "share", owner, "dr:who", "1.2.3.4.5.404", at(1)),  # unknown study
        _share("demo-bad-2", "share", owner, owner, study, at(1)),  # grantee is the owner
        {**_share("demo-bad-3", "share", owner, "dr:who", study, at(1)), "requested_at": "soon"},
    ]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    home.manifests.put_bytes("shares/demo-requests.jsonl", text.encode())
    csv_rows = [
        "request_id,action,owner,grantee,study_uid,requested_at,expires_at,purpose",
        f"demo-c1,share,{owner},dr:temp,{study},{at(3)},{at(1)},",  # already expired
        "demo-c2,share,this line is broken",
    ]
    home.manifests.put_bytes("shares/demo-requests.csv", ("\n".join(csv_rows) + "\n").encode())
    return len(rows) + len(csv_rows) - 1


DEMO_GRANTEES = ("dr:house", "clinic:north")


def register_demo_keys(home: Home, root: Path) -> None:
    """Age identities for two grantees: public keys into the recipients registry, private
    keys (0600) under ``{root}/demo-grantee-keys/`` for opening the packages."""
    from pyrage import x25519

    folder = root / "demo-grantee-keys"
    folder.mkdir(mode=0o700, exist_ok=True)
    rows = []
    for n, user in enumerate(DEMO_GRANTEES):
        ident = x25519.Identity.generate()
        path = folder / f"{user.replace(':', '-')}.agekey"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"# public key: {ident.to_public()}\n{ident}\n")
        rows.append(
            {
                "request_id": f"demo-key-{n}",
                "user": user,
                "age_public_key": str(ident.to_public()),
                "requested_at": datetime.now(UTC).isoformat(),
            }
        )
    text = "".join(json.dumps(r) + "\n" for r in rows)
    home.manifests.put_bytes("recipients/demo-keys.jsonl", text.encode())


def revoke_one_delivered(home: Home, owner: str, study: str) -> None:
    """The owner withdraws the first delivered share (its package must go at once)."""
    row = _share("demo-revoke-delivered", "revoke", owner, "dr:house", study, "")
    row["requested_at"] = datetime.now(UTC).isoformat()
    home.manifests.put_bytes("shares/demo-revoke.jsonl", (json.dumps(row) + "\n").encode())


def publish_demo_policy(home: Home) -> None:
    """A material policy version taking effect in 30 days."""
    text = b"dropvault network policy, version 2026-12 (demo text)"
    doc = {
        "version": "2026-12",
        "effective_on": (datetime.now(UTC) + timedelta(days=30)).date().isoformat(),
        "material": True,
        "text_sha256": hashlib.sha256(text).hexdigest(),
    }
    home.manifests.put_bytes("policy/2026-12.json", json.dumps(doc).encode())


def write_demo_deletions(home: Home, owned: list[tuple[str, str]]) -> None:
    """Two deletions (one keeping an archive) and one bad request."""
    now = datetime.now(UTC)
    rows = [
        {
            "request_id": "demo-del-1",
            "owner": owned[-1][0],
            "study_uid": owned[-1][1],
            "requested_at": (now - timedelta(hours=2)).isoformat(),
            "keep_archive": "false",
        },
        {
            "request_id": "demo-del-2",
            "owner": owned[-2][0],
            "study_uid": owned[-2][1],
            "requested_at": (now - timedelta(hours=20)).isoformat(),
            "keep_archive": "true",
        },
        {
            "request_id": "demo-del-bad",
            "owner": owned[0][0],
            "study_uid": owned[1][1],
            "requested_at": now.isoformat(),
            "keep_archive": "false",
        },  # not the owner's study
    ]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    home.manifests.put_bytes("deletions/demo-deletions.jsonl", text.encode())


def write_demo_hits(home: Home, days: int = 30, per_day: int = 1500) -> list[str]:
    """A month of realistic hits, some with identifiers in them and some small cells."""
    rng = random.Random(11)  # noqa: S311 - demo data
    start = datetime.now(UTC).date() - timedelta(days=days)
    names = []
    for i in range(days):
        day = (start + timedelta(days=i)).isoformat()
        hits = [samples.make_hit(rng, day) for _ in range(rng.randint(per_day // 2, per_day))]
        kind = ("hits.jsonl", "hits.jsonl.gz", "hits.csv")[i % 3]
        samples.write_hits(home.beacons, day, hits, name=kind)
        sends = "".join(f"{c},{rng.randint(400, 900)}\n" for c in samples.CAMPAIGNS)
        home.beacons.put_bytes(f"{day}/sends.csv", ("campaign,sends\n" + sends).encode())
        names.append(day)
    home.beacons.put_bytes(f"{names[0]}/broken.jsonl", b'{"beacon": "page_view"\nnot json\n')
    return names


def _share(
    rid: str, action: str, owner: str, grantee: str, study: str, when: str
) -> dict[str, str]:
    return {
        "request_id": rid,
        "action": action,
        "owner": owner,
        "grantee": grantee,
        "study_uid": study,
        "requested_at": when,
    }


def run_demo(
    settings: Settings | None = None,
    progress: Callable[[str], None] | None = None,
    reset: bool = False,
) -> DemoSummary:
    """Write demo drops under the settings' home and run every flow that exists.

    A home that already holds data is refused (a second demo would stack on the first),
    unless ``reset``: then a home the demo made is emptied first (see
    :func:`prepare_demo_home`). ``progress`` is told what each step is about to do.
    """
    say = progress or (lambda _msg: None)
    settings = (settings or Settings.load()).model_copy(update={"quiet_seconds": 0.0})
    prepare_demo_home(settings, reset)
    fresh = HomeRecord.read(settings.home.resolve()) is None
    home, made = settings.init_home()  # the demo makes its own home (or checks it)
    record = HomeRecord.read(settings.home.resolve())
    if fresh and record is not None:
        (settings.home.resolve() / DEMO_MARK).write_text(_mark_text(record), encoding="utf-8")
    say(made)
    say("1/7 writing demo drops from pydicom's samples")
    drops, files, owned = write_demo_drops(home)
    say("2/7 ingest-drops: validate, encrypt, catalog")
    stats = ingest_drops(home=home, settings=settings)
    say("3/7 apply-share-manifests")
    write_demo_share_manifests(home, owned)
    sharing = apply_share_manifests(home=home, settings=settings)
    sample_owner = owned[0][0]
    say("4/7 deliver-shares: grantees' keys, packages to the outbox, one grant revoked")
    register_demo_keys(home, settings.home.resolve())
    delivery = deliver_shares(home=home, settings=settings)
    revoked = home.catalog.query(
        "SELECT name FROM deliveries WHERE grantee = 'dr:house' AND study_uid = ?",
        [owned[0][1]],
    )["name"].tolist()
    revoke_one_delivered(home, *owned[0])
    apply_share_manifests(home=home, settings=settings)
    say("5/7 policy-notices for a material policy change")
    publish_demo_policy(home)
    policy = policy_notices(home=home, settings=settings)
    say("6/7 deletion-sweep")
    write_demo_deletions(home, owned)
    sweep = deletion_sweep(home=home, settings=settings)
    say("7/7 compile-beacon-stats over a month of hits")
    beacon_days = write_demo_hits(home)
    days = compile_beacon_stats(home=home, settings=settings)
    reader = home.catalog.read_only()
    tables = table_counts(home.catalog)
    by_reason: pd.DataFrame = reader.sql("SELECT reason, count(*) AS n FROM quarantine GROUP BY 1")
    return DemoSummary(
        home=str(settings.home.resolve()),
        drops_written=drops,
        files_written=files,
        ingest=stats.as_dict(),
        tables=tables,
        quarantine=dict(zip(by_reason["reason"], by_reason["n"].astype(int), strict=True)),
        sharing=sharing.summary(),
        access_owner=sample_owner,
        access=access_list(home.catalog, sample_owner),
        deletion=sweep.summary(),
        delivery=delivery.summary(),
        revoked_package_gone=bool(revoked) and not home.outbox.remaining(revoked[0]),
        policy=policy.summary(),
        beacons={
            "days": len(days),
            "lines": sum(d.lines for d in days),
            "malformed": sum(d.malformed for d in days),
            "scrubbed": sum(d.scrubbed for d in days),
            "bots": sum(d.bots for d in days),
            "cells": sum(d.cells for d in days),
            "suppressed": sum(d.suppressed for d in days),
            "first_day": beacon_days[0],
        },
        sla=deletion_sla(home.catalog, settings.deletion_at_risk_hours),
    )
