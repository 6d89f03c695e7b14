"""Scale-out on DuckLake: several workers, one catalog (metadata in a real PostgreSQL,
Parquet on moto's S3)."""

from __future__ import annotations

import random
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import pytest

from dropvault.storage.catalog import DUCKDB_ONLY, Catalog, migrations
from dropvault.storage.ducklake import Lake, portable_sql
from dropvault.storage.locations import Location
from dropvault.tasks import samples
from dropvault.tasks.layout import in_shard
from tests.conftest import lake_factory
from tests.helpers import EXE, cli_env, lake_env, sources
from tests.postgres import PostgresServer

pytestmark = pytest.mark.integration


@pytest.fixture
def new_lake(postgres: PostgresServer, moto_endpoint: str) -> Callable[[], Lake]:
    return lake_factory(postgres, moto_endpoint)


def test_two_workers_ingest_different_drops_at_once(
    tmp_path: Path, new_lake: Callable[[], Lake]
) -> None:
    """``dropvault ingest --shard 0/2`` and ``--shard 1/2`` run at the same time on one lake.
    One file is dropped twice, once in each shard: it must be cataloged once."""
    rng = random.Random(7)
    home_dir = tmp_path / "home"
    drops = Location((home_dir / "drops").as_uri())
    drops.ensure()
    expected: set[str] = set()
    keys = [f"fac-{i % 3}/d{i}" for i in range(12)]
    shard0 = [k for k in keys if in_shard(k, "0/2")]
    shard1 = [k for k in keys if in_shard(k, "1/2")]
    assert shard0 and shard1  # both workers have work
    twice = b""
    for key in sorted(keys, key=lambda k: k != shard0[0]):  # shard 0's first drop first
        patient = samples.make_patient(rng, rng.randrange(10**6))
        _, files = samples.make_study(rng, patient, 4, "MR_small.dcm")
        if key == shard1[0]:
            files["again.dcm"] = twice  # the same bytes as a file in shard 0
        facility, drop_id = key.split("/")
        samples.write_drop(drops, facility, drop_id, files)
        expected |= {samples.sop_uid(d) for d in files.values() if d}
        if key == shard0[0]:
            twice = next(iter(files.values()))
    lake = new_lake()
    env = {**cli_env(home_dir), **lake_env(lake)}
    subprocess.run([EXE, "init"], env=env, check=True, capture_output=True, timeout=300)  # noqa: S603
    workers = [
        subprocess.Popen(  # noqa: S603
            [EXE, "ingest", "--shard", shard],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for shard in ("0/2", "1/2")
    ]
    outputs = [w.communicate(timeout=300) for w in workers]
    for worker, (out, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err[-2000:]
        assert "ingested: 0" not in out  # each worker did its share

    catalog = Catalog(lake)
    assert catalog.query(
        "SELECT sop_instance_uid FROM instances GROUP BY 1 HAVING count(*) > 1"
    ).empty
    got = set(catalog.query("SELECT sop_instance_uid FROM instances")["sop_instance_uid"])
    assert got == expected
    # When both workers commit the twice-dropped file at the same moment, the later commit
    # conflicts, reruns, finds it taken and leaves its source for the next pass to classify.
    # The next scheduled pass (here: one more run) settles it.
    rerun = subprocess.run(  # noqa: S603
        [EXE, "ingest"], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    counts = catalog.query(
        "SELECT count(*)::INT AS drops, sum(ingested)::INT AS ingested,"
        " sum(duplicates)::INT AS duplicates"
        " FROM drops"
    )
    # The twice-dropped file is counted once as ingested and once as a duplicate, whether
    # the workers raced on it or not. (When they raced, the loser's drop is left half done;
    # the rerun must take it up at once, not leave it waiting to go incomplete.)
    record = counts.to_dict("records")[0]
    assert record == {"drops": len(keys), "ingested": len(expected), "duplicates": 1}
    vault = Location((home_dir / "vault").as_uri())
    assert len(vault.list()) == len(expected)  # no object lost, none left over
    objects = catalog.query(
        "SELECT count(*) AS n FROM objects o JOIN instances i USING (object_id)"
    )["n"][0]
    assert objects == len(expected)
    assert sources(drops) == []  # every source removed once cataloged
    catalog.close()


def test_overlapping_writes_serialise_without_prefect(new_lake: Callable[[], Lake]) -> None:
    """Two processes' worth of catalogs (two DuckDB instances on one lake), no concurrency
    slot: each write reads, waits, then inserts what it did not find. DuckLake alone would
    commit both (its retry sees no conflict between two inserts); the ``catalog_writes``
    row makes the later one conflict, rerun and find the other's row."""
    lake = new_lake()
    Catalog(lake).migrate()
    attempts: list[int] = []
    barrier = threading.Barrier(2)

    def claim(con: duckdb.DuckDBPyConnection) -> None:
        attempts.append(1)
        found = con.execute("SELECT count(*) FROM facilities WHERE facility_id = 'f'").fetchone()
        if len(attempts) <= 2:
            barrier.wait(timeout=30)  # both have read before either commits
        time.sleep(0.2)
        if found and found[0] == 0:
            con.execute("INSERT INTO facilities VALUES ('f', now())")

    catalogs = [Catalog(lake), Catalog(lake)]
    threads = [threading.Thread(target=c.write, args=(claim,)) for c in catalogs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    n = Catalog(lake).query("SELECT count(*) AS n FROM facilities WHERE facility_id = 'f'")
    assert n["n"][0] == 1
    assert len(attempts) == 3  # the loser ran again
    for c in catalogs:
        c.close()


def test_migrations_are_portable() -> None:
    """The one copy of the SQL, as DuckLake takes it: keys and indexes stripped, nothing else."""
    sql = (
        "CREATE TABLE a (x VARCHAR PRIMARY KEY, y INT);\n"
        "CREATE TABLE b (d DATE NOT NULL, k VARCHAR, PRIMARY KEY (d, k));\n"
        "CREATE INDEX b_k ON b (k);\n"
    )
    assert portable_sql(sql) == (
        "CREATE TABLE a (x VARCHAR, y INT);\nCREATE TABLE b (d DATE NOT NULL, k VARCHAR);\n\n"
    )


def test_lake_settings_fail_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    from dropvault.flows.settings import Settings, SettingsError

    monkeypatch.setenv("DROPVAULT_CATALOG_URL", "ducklake:postgres:dbname=x host=db")
    with pytest.raises(SettingsError, match="DROPVAULT_CATALOG_DATA_URL"):
        Settings.load()
    monkeypatch.setenv("DROPVAULT_CATALOG_DATA_URL", "ftp://somewhere/")
    with pytest.raises(SettingsError, match="DROPVAULT_CATALOG_DATA_URL"):
        Settings.load()
    monkeypatch.setenv("DROPVAULT_CATALOG_DATA_URL", "s3://bucket/lake/")
    target = Settings.load().catalog_target()
    assert isinstance(target, Lake) and target.metadata == "dbname=x host=db"
    # A password given to the Python API directly is still kept out of reprs.
    lake = Lake(metadata="dbname=x password=hunter2", data_url="s3://bucket/lake/")
    assert "hunter2" not in repr(Catalog(lake))


def migrate_together(lake: Lake, workers: int = 2) -> list[BaseException]:
    """Migrate ``lake`` from ``workers`` threads at once, each with its own Catalog (as
    workers starting together would); returns what they raised."""
    errors: list[BaseException] = []

    def start() -> None:
        try:
            Catalog(lake).migrate()
        except BaseException as exc:  # noqa: BLE001 - returned to the caller
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return errors


def test_two_workers_applying_a_no_op_migration_record_it_once(
    new_lake: Callable[[], Lake], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DuckDB-only migration changes nothing on a lake; two workers that both find it
    missing must still conflict, or both record it. The barrier makes them interleave."""
    lake = new_lake()
    Catalog(lake).migrate()
    last = max(v for v, _, sql in migrations() if sql.startswith(DUCKDB_ONLY))
    Catalog(lake).write(
        lambda con: con.execute("DELETE FROM schema_migrations WHERE version = ?", [last])
    )
    both_checked = threading.Barrier(2, timeout=30)

    def adapt(sql: str) -> str:
        if sql == "SELECT 1":  # the no-op: both workers have seen the version missing
            both_checked.wait()
        return portable_sql(sql)

    monkeypatch.setattr("dropvault.storage.ducklake.portable_sql", adapt)
    assert migrate_together(lake) == []
    rows = Catalog(lake).query(
        "SELECT count(*) AS n FROM schema_migrations WHERE version = ?", [last]
    )["n"][0]
    assert rows == 1


def test_workers_starting_together_on_a_new_lake_both_open_it(
    new_lake: Callable[[], Lake],
) -> None:
    """The first ATTACH of a lake creates its metadata tables; two workers doing it at once
    raced ("Failed to initialize DuckLake", 5 times in 6 before the retry)."""
    for _ in range(3):
        lake = new_lake()
        assert migrate_together(lake) == []
        versions = Catalog(lake).query("SELECT count(*) AS n FROM schema_migrations")["n"][0]
        assert versions == len(migrations())
