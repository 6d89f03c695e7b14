"""The command line, run as a user would: a real ``dropvault`` process on a demo home."""

from __future__ import annotations

import io
import json
import random
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from dropvault.storage.home import Home
from tests.helpers import EXE, cli_env

pytestmark = pytest.mark.integration


def dv(home: Path, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [EXE, *args],
        env={**cli_env(home), **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"dropvault {args} failed: {proc.stderr[-2000:]}")
    return proc


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("demo") / ".dropvault"
    proc = dv(home, "demo")
    assert "ingested" in proc.stdout and "quarantine by reason" in proc.stdout
    return home


def test_demo_fills_the_catalog(demo_home: Path) -> None:
    rows = json.loads(
        dv(
            demo_home,
            "sql",
            "SELECT count(DISTINCT facility_id) AS f, count(*) AS n,"
            " count(DISTINCT patient_key) AS p FROM studies",
            "--json",
        ).stdout
    )
    assert rows[0]["f"] == 5 and rows[0]["p"] >= 20
    reasons = {
        r["reason"] for r in json.loads(dv(demo_home, "quarantine", "list", "--json").stdout)
    }
    assert {"not_dicom", "truncated", "missing_uid", "uid_conflict", "cd_extra"} <= reasons
    # The ZIP facility's 3 archives of 3 images, and the CD's 31 images, are all in.
    per = json.loads(
        dv(
            demo_home,
            "sql",
            "SELECT facility_id, count(*) AS n FROM instances GROUP BY 1 ORDER BY 1",
            "--json",
        ).stdout
    )
    counts = {r["facility_id"]: r["n"] for r in per}
    assert counts["lakeside-pacs"] == 9 and counts["county-cd-desk"] == 31


def test_demo_delivers_packages_only_the_grantee_opens(demo_home: Path) -> None:
    from pyrage import decrypt, x25519

    packages = json.loads(dv(demo_home, "deliveries", "dr:house", "--json").stdout)
    assert packages, "the demo delivers to dr:house"
    key_file = demo_home / "demo-grantee-keys" / "dr-house.agekey"
    assert key_file.stat().st_mode & 0o777 == 0o600
    ident = x25519.Identity.from_str(key_file.read_text().splitlines()[-1])
    blob = (demo_home / "outbox" / packages[0]["name"]).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(decrypt(blob, [ident]))) as tar:
        names = tar.getnames()
    assert names[0] == "index.json" and len(names) == packages[0]["files"] + 1
    # The revoked grant's package is not offered and not in the outbox.
    gone = json.loads(
        dv(
            demo_home,
            "sql",
            "SELECT name FROM deliveries WHERE status = 'withdrawn'",
            "--json",
        ).stdout
    )
    assert gone and not any((demo_home / "outbox" / g["name"]).exists() for g in gone)
    versions = json.loads(dv(demo_home, "policy-notices", "--json").stdout)
    assert versions[0]["material"] and versions[0]["notified"] > 0


def test_sql_json_is_array_of_objects(demo_home: Path) -> None:
    out = json.loads(
        dv(
            demo_home,
            "sql",
            "SELECT facility_id, first_seen_at FROM facilities ORDER BY 1",
            "--json",
        ).stdout
    )
    assert isinstance(out, list) and set(out[0]) == {"facility_id", "first_seen_at"}


def test_sql_is_read_only(demo_home: Path) -> None:
    proc = dv(demo_home, "sql", "DELETE FROM instances", check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error:") and len(proc.stderr.strip().splitlines()) == 1


def test_export_round_trip(demo_home: Path, tmp_path: Path) -> None:
    uid = json.loads(
        dv(
            demo_home, "sql", "SELECT sop_instance_uid, sha256 FROM instances LIMIT 1", "--json"
        ).stdout
    )[0]
    out = tmp_path / "img.dcm"
    dv(demo_home, "export", uid["sop_instance_uid"], "--out", str(out))
    import hashlib

    assert hashlib.sha256(out.read_bytes()).hexdigest() == uid["sha256"]
    missing = dv(demo_home, "export", "1.2.3", "--out", str(tmp_path / "x"), check=False)
    assert missing.returncode == 1 and "no cataloged instance" in missing.stderr


def test_quarantine_export(demo_home: Path, tmp_path: Path) -> None:
    rows = json.loads(dv(demo_home, "quarantine", "list", "--json").stdout)
    text = next(r for r in rows if r["reason"] == "not_dicom")
    out = tmp_path / "q.bin"
    dv(demo_home, "quarantine", "export", text["quarantine_id"], "--out", str(out))
    assert out.read_bytes().startswith(b"Patient report")


def test_bad_setting_fails_at_start_naming_it(tmp_path: Path) -> None:
    proc = dv(tmp_path / "h", "ingest", check=False, DROPVAULT_QUIET_SECONDS="soon")
    assert proc.returncode == 1
    assert "DROPVAULT_QUIET_SECONDS" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_sharing_commands(demo_home: Path) -> None:
    acl = json.loads(dv(demo_home, "access-list", "user:demo-001", "--json").stdout)
    assert acl and set(acl[0]) == {
        "owner",
        "grantee",
        "scope",
        "study_uid",
        "granted_at",
        "expires_at",
        "status",
    }
    assert {r["status"] for r in acl} >= {"active", "expired"}
    study = next(r["study_uid"] for r in acl if r["scope"] == "study")
    who = json.loads(dv(demo_home, "who-can-access", study, "--json").stdout)
    users = {r["user_id"] for r in who}
    # dr:house's share of it was delivered and then revoked by the demo; clinic:north has '*'.
    assert {"user:demo-001", "clinic:north"} <= users and "dr:house" not in users
    assert "court:oslo" in dv(demo_home, "disclosures", "user:demo-005").stdout


def test_shares_dry_run_then_apply(demo_home: Path) -> None:
    acl = json.loads(dv(demo_home, "access-list", "user:demo-003", "--json").stdout)
    study = next(r["study_uid"] for r in acl if r["scope"] == "study")
    line = json.dumps(
        {
            "request_id": "cli-1",
            "action": "share",
            "owner": "user:demo-003",
            "grantee": "dr:cli",
            "study_uid": study,
            "requested_at": "2026-11-01T00:00:00Z",
        }
    )
    manifest = demo_home / "manifests" / "shares" / "cli.jsonl"
    manifest.write_text(line + "\n")
    dry = dv(demo_home, "shares", "--dry-run").stdout
    assert "dry run" in dry and "+ user:demo-003 -> dr:cli" in dry and manifest.exists()
    assert "dr:cli" not in dv(demo_home, "access-list", "user:demo-003").stdout
    dv(demo_home, "shares")
    assert not manifest.exists()
    assert "dr:cli" in dv(demo_home, "access-list", "user:demo-003").stdout


def test_incident_command(demo_home: Path) -> None:
    acl = json.loads(dv(demo_home, "access-list", "user:demo-007", "--json").stdout)
    study = next(r["study_uid"] for r in acl if r["grantee"] == "dr:house")
    out = dv(
        demo_home,
        "incident",
        "--user",
        "dr:house",
        "--study",
        study,
        "--reported-at",
        "2026-11-20T10:00:00Z",
    ).stdout
    assert "Notification deadline" in out and "2027-01-19" in out
    who = json.loads(dv(demo_home, "who-can-access", study, "--json").stdout)
    assert "dr:house" not in {r["user_id"] for r in who}


def test_deletion_commands(demo_home: Path) -> None:
    rows = json.loads(dv(demo_home, "deletions", "--json").stdout)
    assert {r["request_id"] for r in rows} == {"demo-del-1", "demo-del-2"}
    assert {r["sla_state"] for r in rows} == {"completed"}
    acl = json.loads(dv(demo_home, "access-list", "user:demo-009", "--json").stdout)
    study = next(r["study_uid"] for r in acl if r["scope"] == "study")
    (demo_home / "manifests" / "deletions" / "cli.jsonl").write_text(
        json.dumps(
            {
                "request_id": "cli-del",
                "owner": "user:demo-009",
                "study_uid": study,
                "requested_at": "2026-11-27T00:00:00Z",
                "keep_archive": "false",
            }
        )
        + "\n"
    )
    dry = dv(demo_home, "sweep", "--dry-run").stdout
    assert "delete cli-del: 1 studies" in dry
    assert (
        json.loads(
            dv(
                demo_home,
                "sql",
                "SELECT count(*) AS n FROM studies WHERE study_uid = '" + study + "'",  # noqa: S608
                "--json",
            ).stdout
        )[0]["n"]
        == 1
    )


def test_beacon_commands(demo_home: Path) -> None:
    day = json.loads(
        dv(demo_home, "sql", "SELECT min(day)::VARCHAR AS d FROM beacon_stats", "--json").stdout
    )[0]["d"]
    rows = json.loads(dv(demo_home, "beacons", "--day", day, "--json").stdout)
    assert rows and set(rows[0]) == {
        "day",
        "beacon",
        "target",
        "partner",
        "hits",
        "unique_visitors",
        "suppressed",
    }
    assert all(r["hits"] is None for r in rows if r["suppressed"])
    assert all(not 1 <= r["hits"] <= 10 for r in rows if not r["suppressed"])
    nl = json.loads(dv(demo_home, "newsletter-suppression", "--json").stdout)
    assert nl and all(r["address_key"].startswith("nl_") for r in nl)


def test_status(demo_home: Path, tmp_path: Path) -> None:
    # A failed run of a flow, as Prefect's API records it, and a drop waiting for a file.
    from prefect import get_client
    from prefect.states import Failed

    from dropvault.flows.ingest import reconcile_vault
    from dropvault.tasks import samples

    with get_client(sync_client=True) as client:
        client.create_flow_run(reconcile_vault, state=Failed(message="disk full (test)"))
    rng = random.Random(3)
    _, files = samples.make_study(rng, samples.make_patient(rng, 3), 2, "CT_small.dcm")
    drops = Home.local(demo_home).drops
    samples.write_drop(drops, "st-olav", "half", files)
    drops.delete(f"st-olav/half/{sorted(files)[0]}")
    try:
        rows = json.loads(dv(demo_home, "status", "--json").stdout)
        listed = json.loads(dv(demo_home, "drops", "--state", "waiting", "--json").stdout)
        other = json.loads(dv(demo_home, "drops", "--facility", "harbor-clinic", "--json").stdout)
    finally:
        for entry in drops.list():
            if entry.name.startswith("st-olav/half/"):
                drops.delete(entry.name)
    keys = ("table", "flow", "state", "reason", "kind", "sla_state")
    by = {(r["section"], next(r[k] for k in keys if r.get(k))): r for r in rows}
    assert by[("tables", "instances")]["rows"] > 0  # numbers are numbers
    assert by[("tables", "tombstones")]["rows"] == 1
    assert by[("flows", "ingest-drops")]["last_state"] == "COMPLETED"
    assert isinstance(by[("flows", "ingest-drops")]["last_seconds"], float)
    reconcile = by[("flows", "reconcile-vault")]
    assert reconcile["last_failure"] == "disk full (test)" and reconcile["last_failure_at"]
    assert by[("deletion_sla", "completed")]["requests"] >= 1
    assert by[("quarantine", "not_dicom")]["files"] == 1
    waiting = [r for r in rows if r["section"] == "waiting"]
    assert len(waiting) == 1 and waiting[0]["facility_id"] == "st-olav"
    assert waiting[0]["missing"] == 1 and "missing" in waiting[0]["why"]
    assert waiting[0]["incomplete_in_seconds"] > 0 and waiting[0]["age_seconds"] >= 0
    assert "half" not in json.dumps(waiting)  # folder names can hold PHI: keyed ids only
    assert [(d["facility_id"], d["status"]) for d in listed] == [("st-olav", "waiting")]
    assert "missing" in listed[0]["why"]
    assert other and {d["facility_id"] for d in other} == {"harbor-clinic"}
    bad = dv(demo_home, "drops", "--state", "stuck", check=False)
    assert bad.returncode == 1 and "--state" in bad.stderr


def test_missing_kek_fails_at_start_with_one_line(tmp_path: Path) -> None:
    from dropvault.storage.home import Home

    home = tmp_path / "h"
    Home.init(home).keystore.create()
    (home / "keys" / "kek.key").unlink()
    proc = dv(home, "ingest", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        next(line for line in proc.stderr.splitlines() if line.startswith("error:"))
    ]
    assert "kek.key is missing" in proc.stderr and not (home / "keys" / "kek.key").exists()


def test_unreadable_catalog_fails_with_no_partial_state(tmp_path: Path) -> None:
    """A corrupt catalog stops ingest before it touches a drop, the vault or the keystore."""
    import random

    from dropvault.storage.home import Home
    from dropvault.tasks import samples

    home_dir = tmp_path / "h"
    home = Home.init(home_dir)
    rng = random.Random(3)
    _, files = samples.make_study(rng, samples.make_patient(rng, 1), 3, "CT_small.dcm")
    samples.write_drop(home.drops, "fac", "d1", files)
    dropped = sorted(e.name for e in home.drops.list())
    catalog = home_dir / "catalog.duckdb"
    garbage = random.Random(4).randbytes(20_000)
    catalog.write_bytes(garbage)

    proc = dv(home_dir, "ingest", check=False, DROPVAULT_QUIET_SECONDS="0")
    assert proc.returncode == 1
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: catalog ") and "cannot be opened" in error, proc.stderr[-500:]
    assert sorted(e.name for e in home.drops.list()) == dropped
    assert home.vault.list() == [] and home.quarantine.list() == []
    assert catalog.read_bytes() == garbage
    with home.keystore._connect() as con:  # noqa: SLF001 - the test looks inside on purpose
        assert con.execute("SELECT count(*) FROM record_keys").fetchone() == (0,)


def test_bad_shard_fails_before_any_work(tmp_path: Path) -> None:
    home = tmp_path / "h"
    proc = dv(home, "ingest", "--shard", "2/2", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: Invalid value for --shard: shard '2/2': need 0 <= i < n"
    ]
    assert not (home / "catalog.duckdb").exists()


def test_ducklake_without_its_data_url_fails_at_start(tmp_path: Path) -> None:
    proc = dv(
        tmp_path / "h",
        "status",
        check=False,
        DROPVAULT_CATALOG_URL="ducklake:postgres:dbname=x host=127.0.0.1 user=hunter2",
    )
    assert proc.returncode == 1
    assert "DROPVAULT_CATALOG_DATA_URL" in proc.stderr and "hunter2" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (("export",), "sop_instance_uid"),
        (("frobnicate",), "frobnicate"),
        (("status", "--bogus"), "--bogus"),
        (("disclosures", "user:x", "--since", "yesterday"), "--since"),
        (("beacons", "--day", "2026-13-01"), "--day"),
        (("quarantine", "list", "--reason", "bogus"), "--reason"),
        (("quarantine", "purge", "--older-than", "0"), "--older-than"),
        (("incident", "--user", "u", "--study", "1.2", "--reported-at", "soon"), "--reported-at"),
    ],
)
def test_usage_errors_are_one_line_exit_1_naming_the_fault(
    demo_home: Path, args: tuple[str, ...], names: str
) -> None:
    proc = dv(demo_home, *args, check=False)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert names in lines[0]
    assert "Traceback" not in proc.stderr and "╭" not in proc.stderr


def test_who_can_access_an_unknown_study_is_an_error(demo_home: Path) -> None:
    proc = dv(demo_home, "who-can-access", "1.2.3.999", check=False)
    assert proc.returncode == 1 and "no study with this UID" in proc.stderr
    assert "1.2.3.999" not in proc.stderr  # a UID typed in is not echoed back


def test_demo_twice_is_refused_and_reset_starts_over(demo_home: Path, tmp_path: Path) -> None:
    again = dv(demo_home, "demo", check=False)
    assert again.returncode == 1 and "--reset" in again.stderr
    count = "SELECT count(*) AS n FROM drops"
    before = json.loads(dv(demo_home, "sql", count, "--json").stdout)[0]["n"]
    copy = tmp_path / "copy" / ".dropvault"
    shutil.copytree(demo_home, copy, ignore=shutil.ignore_patterns("prefect"))
    # A home with data that the demo did not make is never emptied by --reset.
    mark = copy / "made-by-dropvault-demo"
    mark.rename(tmp_path / "mark")
    refused = dv(copy, "demo", "--reset", check=False)
    assert refused.returncode == 1 and "only a home the demo made" in refused.stderr
    mark.write_text("")  # a mark planted by hand does not name this home
    planted = dv(copy, "demo", "--reset", check=False)
    assert planted.returncode == 1 and "only a home the demo made" in planted.stderr
    mark.unlink()
    assert json.loads(dv(copy, "sql", count, "--json").stdout)[0]["n"] == before
    (tmp_path / "mark").rename(mark)
    dv(copy, "demo", "--reset")
    after = json.loads(dv(copy, "sql", count, "--json").stdout)[0]["n"]
    assert after == before  # started over, not stacked


def test_an_ingest_with_nothing_to_do_starts_no_prefect_server(tmp_path: Path) -> None:
    """Embedded (no PREFECT_API_URL): an empty drop zone is answered without Prefect's
    temporary server (no run recorded), and one file in it makes the flow run."""
    home = tmp_path / "home"
    # No server, and Prefect's home under the dropvault home (CI sets its own PREFECT_HOME).
    env = {k: v for k, v in cli_env(home).items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [EXE, *args], env=env, capture_output=True, text=True, timeout=300, check=True
        )

    run("init")
    quiet = run("ingest")
    assert quiet.stdout.startswith("nothing to ingest")
    assert not (home / "prefect" / "prefect.db").exists()
    # A receipt alone is not work either; a file waiting in a drop is.
    (home / "drops" / "fac" / "_receipts").mkdir(parents=True)
    (home / "drops" / "fac" / "_receipts" / "old.json").write_text("{}")
    assert "nothing to ingest" in run("ingest").stdout
    (home / "drops" / "fac" / "d1").mkdir(parents=True)
    (home / "drops" / "fac" / "d1" / "a.dcm").write_bytes(b"not yet quiet")
    busy = run("ingest")
    assert "nothing to ingest" not in busy.stdout and "drops_waiting: 1" in busy.stdout
    assert (home / "prefect" / "prefect.db").exists()


def test_deliver_shares_command_prints_its_summary(demo_home: Path) -> None:
    out = dv(demo_home, "deliver-shares").stdout.strip().splitlines()
    summary = json.loads(out[-1])
    assert summary["delivered"] == 0 and summary["all_withdrawals_verified"] is True
