"""Drop folder names are PHI: keyed ids everywhere, the real name only sealed (issue #17).

The tests read what an attacker with a copy of the files would read: the catalog's bytes,
every quarantine object and its path, and Prefect's own database.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.sorting import LogSort
from prefect.logging.handlers import APILogHandler
from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

from dropvault.flows.ingest import ingest_drops
from dropvault.flows.settings import Settings
from dropvault.storage.home import Home
from dropvault.tasks import samples
from dropvault.tasks.drop_names import DROP_ID, drops_list
from dropvault.tasks.drop_rekey import rekey_drops
from dropvault.tasks.quarantine import quarantine_export, quarantine_list_named
from tests.helpers import drop_ref, sources

QUIET = Settings(quiet_seconds=0)
# What facilities name folders (and files) after.
PATIENT_DROP = "DOE_JANE_MRN55501234"
WAITING_DROP = "SMITH_JOHN_DOB19600101"
BAD_FILE = "ROE_RICHARD_chest.dcm"


def hostile_drops(home: Home, rng: random.Random) -> str:
    """A drop named after a patient holding two good images and one bad one, and a second
    patient-named drop whose manifest lists a file that never came (it waits)."""
    uid, files = samples.make_study(rng, samples.make_patient(rng, 1), 2, "CT_small.dcm")
    files[BAD_FILE] = b"not a dicom file at all" * 10
    samples.write_drop(home.drops, "fac-a", PATIENT_DROP, files, manifest=False)
    samples.write_drop(home.drops, "fac-a", WAITING_DROP, {}, listed={"missing.dcm": b"x" * 100})
    return uid


def everything_stored(home: Home) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of the catalog's files and every quarantine object."""
    home.catalog.drop_reader()
    stored = list(home.catalog.stored_files())
    for entry in home.quarantine.list():
        stored.append((entry.name, home.quarantine.read_bytes(entry.name)))
    return stored


def prefect_logs() -> list[str]:
    async def read() -> list[str]:
        async with get_client() as client:
            found = await client.read_logs(sort=LogSort.TIMESTAMP_DESC, limit=200)
            return [log.message for log in found]

    return asyncio.run(read())


def prefect_database(until_logged: str) -> bytes:
    """The bytes of the test harness's Prefect database (logs, artifacts, parameters), once
    the API shows a log line holding ``until_logged`` (so the logs are in)."""
    APILogHandler().flush()
    deadline = time.monotonic() + 30
    while not any(until_logged in m for m in prefect_logs()):
        assert time.monotonic() < deadline, f"no log line names {until_logged}"
        time.sleep(0.2)
    url = PREFECT_API_DATABASE_CONNECTION_URL.value()
    path = Path(url.split("///", 1)[1])
    return b"".join(
        p.read_bytes() for p in (path, path.with_name(path.name + "-wal")) if p.exists()
    )


@pytest.mark.usefixtures("run_logs_at_debug")
def test_no_drop_or_file_name_is_readable_in_the_catalog_quarantine_or_prefect(
    home: Home, rng: random.Random
) -> None:
    hostile_drops(home, rng)
    stats = ingest_drops(home=home, settings=QUIET)
    assert (stats.ingested, sum(stats.quarantined.values()), stats.drops_waiting) == (2, 1, 1)
    for name, data in everything_stored(home):
        for secret in (PATIENT_DROP, WAITING_DROP, "ROE_RICHARD"):
            assert secret not in name, name
            assert secret.encode() not in data, name
    # The waiting drop's log line names its keyed id: once it is in, so is every log.
    prefect = prefect_database(until_logged=drop_ref(home, "fac-a", WAITING_DROP))
    for secret in (PATIENT_DROP, WAITING_DROP, "ROE_RICHARD"):
        assert secret.encode() not in prefect
    # Every row names the drop by its keyed id, and the quarantine path and facts do too.
    ref = drop_ref(home, "fac-a", PATIENT_DROP)
    for table in ("drops", "instances", "quarantine"):
        ids = set(home.catalog.query(f"SELECT DISTINCT drop_id FROM {table}")["drop_id"])  # noqa: S608
        assert ids == {ref}, table
    [facts] = [e.name for e in home.quarantine.list() if e.name.endswith(".json")]
    assert facts.startswith(f"fac-a/{ref}/")
    assert json.loads(home.quarantine.read_bytes(facts))["drop_id"] == ref
    assert drop_ref(home, "fac-a", WAITING_DROP).encode() in prefect


def test_an_operator_with_the_keys_sees_the_real_names_and_the_viewing_is_audited(
    local_home: Home, rng: random.Random
) -> None:
    home = local_home
    hostile_drops(home, rng)
    ingest_drops(home=home, settings=QUIET)
    plain = drops_list(home)
    assert "name" not in plain.columns
    assert all(DROP_ID.fullmatch(d) for d in plain["drop_id"])
    named = drops_list(home, names=True)
    assert named["name"].tolist() == [PATIENT_DROP]
    [row] = quarantine_list_named(home).to_dict("records")
    assert (row["drop_name"], row["file_name"]) == (
        PATIENT_DROP,
        f"fac-a/{PATIENT_DROP}/{BAD_FILE}",
    )
    viewed = home.catalog.query(
        "SELECT action, subject FROM audit_log WHERE action LIKE '%names_viewed' ORDER BY 1"
    )
    assert viewed.values.tolist() == [["drop_names_viewed", "1"], ["quarantine_names_viewed", "1"]]


def test_the_same_folder_keeps_its_id_and_ids_differ_by_facility(
    local_home: Home, rng: random.Random
) -> None:
    """A drop that arrives in two passes is one drop; another facility's same name is not."""
    uid, files = samples.make_study(rng, samples.make_patient(rng, 1), 2, "CT_small.dcm")
    first, second = dict(list(files.items())[:1]), dict(list(files.items())[1:])
    samples.write_drop(local_home.drops, "fac-a", PATIENT_DROP, first, manifest=False)
    ingest_drops(home=local_home, settings=QUIET)
    samples.write_drop(local_home.drops, "fac-a", PATIENT_DROP, second, manifest=False)
    samples.write_drop(local_home.drops, "fac-b", PATIENT_DROP, {}, listed={"x.dcm": b"x"})
    ingest_drops(home=local_home, settings=QUIET)
    rows = local_home.catalog.query("SELECT drop_id, files_seen FROM drops").values.tolist()
    assert rows == [[drop_ref(local_home, "fac-a", PATIENT_DROP), 2]]
    assert drop_ref(local_home, "fac-a", PATIENT_DROP) != drop_ref(
        local_home, "fac-b", PATIENT_DROP
    )


def make_legacy(home: Home) -> None:
    """Turn a catalog back into what dropvault wrote before keyed drop ids: plain folder
    names in every row, the quarantine under the plain folder, and in audit subjects."""
    ref = drop_ref(home, "fac-a", PATIENT_DROP)
    [(object_id, name)] = home.catalog.query(
        "SELECT object_id, name FROM objects WHERE kind = 'quarantine'"
    ).values.tolist()
    old = f"fac-a/{PATIENT_DROP}/{object_id}.dvlt"
    home.quarantine.move(name, home.quarantine, old)
    facts = json.loads(home.quarantine.read_bytes(name.replace(".dvlt", ".json")))
    facts["drop_id"] = PATIENT_DROP
    home.quarantine.put_bytes(old.replace(".dvlt", ".json"), json.dumps(facts).encode())
    home.quarantine.delete(name.replace(".dvlt", ".json"))

    def work(con: object) -> None:
        sql = con.execute  # type: ignore[attr-defined]
        sql(
            "UPDATE drops SET drop_id = ?, record_key_id = NULL, name_enc = NULL",
            [PATIENT_DROP],
        )
        sql("UPDATE instances SET drop_id = ?", [PATIENT_DROP])
        sql("UPDATE quarantine SET drop_id = ?", [PATIENT_DROP])
        sql("UPDATE objects SET name = ? WHERE object_id = ?", [old, object_id])
        sql(
            "UPDATE audit_log SET subject = replace(subject, ?, ?) WHERE action = 'ingest_batch'",
            [ref, PATIENT_DROP],
        )

    home.catalog.write(work)


def test_an_older_catalog_is_rekeyed_and_its_names_leave_every_file(
    home: Home, rng: random.Random, tmp_path: Path
) -> None:
    hostile_drops(home, rng)
    ingest_drops(home=home, settings=QUIET)
    make_legacy(home)
    assert any(PATIENT_DROP.encode() in data for _, data in everything_stored(home))
    stats = ingest_drops(home=home, settings=QUIET)  # the next pass re-keys first
    assert stats.ingested == 0
    for name, data in everything_stored(home):
        assert PATIENT_DROP not in name
        assert PATIENT_DROP.encode() not in data, name
    ref = drop_ref(home, "fac-a", PATIENT_DROP)
    assert set(home.catalog.query("SELECT drop_id FROM instances")["drop_id"]) == {ref}
    subjects = home.catalog.query(
        "SELECT DISTINCT subject FROM audit_log WHERE action = 'ingest_batch'"
    )["subject"]
    assert all(ref in s for s in subjects if s)
    assert drops_list(home, names=True)["name"].tolist() == [PATIENT_DROP]
    # The moved quarantine object still opens, and its name still opens.
    [qid] = home.catalog.query("SELECT quarantine_id FROM quarantine")["quarantine_id"]
    result = quarantine_export(home, qid, tmp_path / "q.bin")
    assert (tmp_path / "q.bin").read_bytes() == b"not a dicom file at all" * 10
    assert result["source_name"].endswith(BAD_FILE)
    assert rekey_drops(home) == 0  # once done, nothing left


@pytest.mark.parametrize("name", ["a,b", "fac-a", "d_" + "0" * 23, "ü café", "x" * 200])
def test_odd_folder_names_get_ids_and_come_back_sealed(
    local_home: Home, rng: random.Random, name: str
) -> None:
    uid, files = samples.make_study(rng, samples.make_patient(rng, 1), 1, "CT_small.dcm")
    samples.write_drop(local_home.drops, "fac-a", name, files, manifest=False)
    ingest_drops(home=local_home, settings=QUIET)
    assert drops_list(local_home, names=True)["name"].tolist() == [name]
    assert sources(local_home.drops) == []


def test_rekey_survives_a_quarantine_object_already_gone_and_leaves_no_named_folder(
    local_home: Home, rng: random.Random
) -> None:
    home = local_home
    hostile_drops(home, rng)
    ingest_drops(home=home, settings=QUIET)
    make_legacy(home)
    [old] = home.catalog.query("SELECT name FROM objects WHERE kind = 'quarantine'")["name"]
    home.quarantine.delete(old)  # expired, or removed by hand
    assert rekey_drops(home) == 1
    assert not list(Path(home.quarantine.root).rglob(f"*{PATIENT_DROP}*"))
    [new] = home.catalog.query("SELECT name FROM objects WHERE kind = 'quarantine'")["name"]
    assert PATIENT_DROP not in new
    assert rekey_drops(home) == 0
