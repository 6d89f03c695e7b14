"""P9: what an analyst can run reaches the catalog only, read-only.

A hostile SQL corpus goes through ``dropvault sql`` against a DuckDB file and
against DuckLake (PostgreSQL metadata, Parquet on moto's S3). Every entry must be
refused with one ``error:`` line and exit 1, print no key, and leave every file
under the home (and the lake's PostgreSQL schema) byte-identical. Ordinary
analyst queries keep working.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from dropvault.flows.cli import app
from dropvault.flows.ingest import ingest_drops
from dropvault.flows.settings import Settings
from dropvault.storage.confinement import QueryRefused
from dropvault.storage.ducklake import EXTENSIONS, extension_path
from dropvault.tasks import samples
from tests.conftest import lake_factory
from tests.postgres import PostgresServer

pytestmark = pytest.mark.integration

HOSTILE = [
    "SELECT filename, base64(content) FROM read_blob('{keys}/*')",
    "SELECT * FROM read_text('{keys}/kek.key')",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_csv_auto('{home}/dropvault-home.json')",
    "SELECT * FROM read_parquet('{home}/**/*.parquet')",
    "SELECT * FROM read_json('{home}/dropvault-home.json')",
    "SELECT * FROM glob('{home}/**')",
    "SELECT * FROM '{keys}/kek.key'",
    "SELECT * FROM '/etc/passwd'",
    "FROM '{home}/drops/**/*.dcm'",
    "COPY (SELECT 'x') TO '{keys}/kek.key' (FORMAT csv)",
    "COPY studies TO '{home}/studies.csv'",
    "COPY studies FROM '{home}/dropvault-home.json'",
    "EXPORT DATABASE '{home}/export'",
    "ATTACH '{home}/evil.duckdb' AS evil",
    "ATTACH '{catalog}' AS rw",
    "ATTACH '{catalog}' AS ro (READ_ONLY)",
    "ATTACH 'dbname=postgres host=127.0.0.1' AS pg (TYPE postgres)",
    "INSTALL httpfs",
    "LOAD httpfs",
    "LOAD '{extension}'",
    "SET enable_external_access = true",
    "RESET lock_configuration",
    "SET allowed_directories = ['/']",
    "PRAGMA enable_profiling",
    "PRAGMA database_size",
    "CALL pragma_version()",
    "CHECKPOINT",
    "USE memory",
    "SELECT * FROM postgres_query('__ducklake_metadata_lake', 'SELECT 1')",
    "CALL postgres_execute('__ducklake_metadata_lake', 'DROP TABLE x')",
    "SELECT * FROM postgres_scan('dbname=lake', 'public', 'x')",
    "SELECT * FROM __ducklake_metadata_lake.main.ducklake_data_file",
    "SELECT * FROM query('SELECT * FROM read_blob(''{keys}/kek.key'')')",
    "SELECT * FROM query_table('studies')",
    "SELECT getenv('HOME')",
    "SELECT 1; SELECT * FROM read_blob('{keys}/kek.key')",
    "SELECT 1 -- harmless\n; COPY (SELECT 'x') TO '{keys}/kek.key'",
    "SELECT 1 /* ; */ ; DELETE FROM instances",
    "DELETE FROM instances",
    "UPDATE studies SET owner = 'user:mallory'",
    "INSERT INTO grants SELECT * FROM grants",
    "DROP TABLE instances",
    "CREATE TABLE stolen AS SELECT * FROM studies",
    "CREATE MACRO m() AS 1",
    "PIVOT instances ON modality",
    "",
    # Found by an outside review: spellings, table macros, functions with side effects.
    "SELECT * FROM __DUCKLAKE_METADATA_LAKE.main.ducklake_data_file",
    "SELECT * FROM __ducklake_metadata_lake.pg_catalog.pg_authid",
    "SELECT * FROM histogram('__ducklake_metadata_lake.pg_catalog.pg_shadow', usename)",
    "SELECT * FROM histogram('studies', owner)",
    "SELECT * FROM lake.merge_adjacent_files()",
    "SELECT * FROM enable_logging(level:='trace', storage:='file', storage_path:='{home}')",
    "SELECT * FROM pandas_scan(NULL)",
    "SELECT * FROM python_map_function(NULL, NULL, NULL)",
    "SELECT current_setting('allowed_paths')",
    "SELECT * FROM duckdb_databases()",
    "SELECT * FROM duckdb_secrets()",
    "SELECT * FROM which_secret('s3://x', 's3')",
    # A second review: system views, a path in the schema part, internal errors.
    "SELECT database_name, path FROM duckdb_databases",
    "SELECT name, setting FROM pg_settings",
    "SELECT * FROM pragma_database_list",
    "SELECT * FROM duckdb_logs",
    "SELECT * FROM pg_catalog.pg_settings",
    'SELECT * FROM "{keys}/kek"."key"',
    'SELECT * FROM "{home}/**/*"."parquet"',
    "SELECT * FROM repeat_row(1, num_rows:=NULL)",
    "SELECT * FROM system.main.duckdb_settings()",
    # A third review: a CTE that reuses a system view's name, SHOW of other databases.
    "WITH duckdb_databases AS (FROM duckdb_databases) SELECT * FROM duckdb_databases",
    "WITH pg_settings AS (FROM pg_settings) SELECT name, setting FROM pg_settings",
    "SELECT name FROM pg_settings, (WITH pg_settings AS (SELECT 1) SELECT 1) x",
    "SHOW DATABASES",
    "SHOW ALL TABLES",
]

ANALYST = [
    # joins, a view, a window function
    "SELECT s.facility_id, count(*) AS n FROM instances i JOIN studies s USING (study_uid)"
    " GROUP BY 1 ORDER BY 1",
    "SELECT owner, grantee, status FROM access_list ORDER BY ALL",
    "SELECT study_uid, row_number() OVER (PARTITION BY facility_id ORDER BY study_uid) AS r"
    " FROM studies",
    "WITH q AS (SELECT reason FROM quarantine) SELECT reason, count(*) FROM q GROUP BY 1",
    "DESCRIBE instances",
    "SELECT * FROM deletion_sla",
    "SELECT table_name FROM information_schema.tables ORDER BY 1",
    "SELECT count(*) FROM main.instances",
    "SELECT * FROM range(3) r, studies LIMIT 2",
    "WITH recent AS (SELECT * FROM studies) SELECT count(*) FROM recent",
    "SHOW TABLES",
    "SUMMARIZE instances",
]


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "prefect" not in p.parts
    }


def schema_dump(pg: PostgresServer, schema: str | None) -> list[bytes]:
    """pg_dump's lines, less its per-run ``\\restrict`` token."""
    return [
        line
        for line in pg.dump(schema).splitlines()
        if not line.startswith((b"\\restrict", b"\\unrestrict"))
    ]


def secrets_of(home: Path) -> list[str]:
    found = []
    for name in ("kek.key", "pepper.key"):
        path = home / "keys" / name
        if path.exists():
            raw = path.read_bytes()
            found += [base64.b64encode(raw).decode(), raw.hex()]
    return found


def populate(settings: Settings) -> None:
    home, _ = settings.init_home()
    rng = random.Random(5)  # noqa: S311 - test data
    study_uid, files = samples.make_study(rng, samples.make_patient(rng, 1), 3, "CT_small.dcm")
    samples.write_drop(home.drops, "fac-a", "d1", files, owners={study_uid: "user:alice"})
    samples.write_drop(home.drops, "fac-a", "d2", {"bad.dcm": samples.not_dicom()})
    ingest_drops(home=home, settings=settings.model_copy(update={"quiet_seconds": 0.0}))


@pytest.fixture(scope="module", params=["duckdb", "ducklake"])
def analyst_home(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, dict[str, str], PostgresServer | None, str | None]]:
    root = tmp_path_factory.mktemp("confined") / ".dropvault"
    env = {"DROPVAULT_HOME": str(root)}
    pg = None
    schema = None
    if request.param == "ducklake":
        pg = request.getfixturevalue("postgres")
        lake = lake_factory(pg, request.getfixturevalue("moto_endpoint"))()
        schema = lake.schema
        env |= {
            "DROPVAULT_CATALOG_URL": "ducklake:postgres:" + lake.metadata,
            "DROPVAULT_CATALOG_DATA_URL": lake.data_url,
            "DROPVAULT_CATALOG_SCHEMA": schema or "",
            "DROPVAULT_S3_ENDPOINT_URL": lake.s3["endpoint_url"],
            "DROPVAULT_S3_KEY": "foo",
            "DROPVAULT_S3_SECRET": "foo",
        }
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    try:
        populate(Settings.load())
        yield root, env, pg, schema
    finally:
        mp.undo()


def use_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def run_sql(env: dict[str, str], *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["sql", *args], env=env)
    return result.exit_code, result.output


def test_hostile_queries_are_refused_and_change_nothing(
    analyst_home: tuple[Path, dict[str, str], PostgresServer | None, str | None],
) -> None:
    root, env, pg, schema = analyst_home
    before = tree_hashes(root)
    dump_before = schema_dump(pg, schema) if pg else []
    keys = secrets_of(root)
    assert keys
    extension = str(extension_path(*next(iter(EXTENSIONS.items()))))
    for template in HOSTILE:
        query = template.format(
            home=root,
            keys=root / "keys",
            catalog=root / "catalog.duckdb",
            extension=extension,
        ).replace("main.ducklake", f"{schema or 'main'}.ducklake")
        code, out = run_sql(env, query)
        lines = out.strip().splitlines()
        assert code == 1, (query, out)
        assert len(lines) == 1 and lines[0].startswith("error: "), (query, out)
        assert not any(k in out for k in keys), query
    assert tree_hashes(root) == before
    if pg:
        assert schema_dump(pg, schema) == dump_before


def test_analyst_queries_still_work(
    analyst_home: tuple[Path, dict[str, str], PostgresServer | None, str | None],
) -> None:
    _, env, _, _ = analyst_home
    for query in ANALYST:
        code, out = run_sql(env, query)
        assert code == 0, (query, out)
    code, out = run_sql(env, "SELECT count(*) AS n FROM instances", "--json")
    assert code == 0 and json.loads(out) == [{"n": 3}]


def test_refusal_names_the_rule(
    analyst_home: tuple[Path, dict[str, str], PostgresServer | None, str | None],
) -> None:
    _, env, _, _ = analyst_home
    code, out = run_sql(env, "DELETE FROM instances")
    assert code == 1 and out.strip() == (
        "error: dropvault sql runs one read-only query (got a DELETE statement)"
    )


def test_notebook_reader_is_confined_too(
    analyst_home: tuple[Path, dict[str, str], PostgresServer | None, str | None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``home.catalog.read_only()``, what notebooks use, goes through the same guard."""
    root, env, _, _ = analyst_home
    use_env(monkeypatch, env)
    reader = Settings.load().build_home().catalog.read_only()
    with pytest.raises(QueryRefused):
        reader.sql(f"SELECT * FROM read_blob('{root}/keys/kek.key')")
    with pytest.raises(QueryRefused):
        reader.sql("DELETE FROM instances")
    assert int(reader.sql("SELECT count(*) AS n FROM instances")["n"][0]) == 3


def test_reader_spills_nothing_and_has_a_memory_limit(
    analyst_home: tuple[Path, dict[str, str], PostgresServer | None, str | None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One huge query must not fill the home's disk with spill files or take the machine's
    memory: no temp directory, and the reader's own memory limit."""
    _, env, _, _ = analyst_home
    use_env(monkeypatch, env)
    monkeypatch.setenv("DROPVAULT_READER_MEMORY_LIMIT", "300MB")
    catalog = Settings.load().reader_catalog()
    with catalog._connect(read_only=True) as con:
        row = con.execute(
            "SELECT current_setting('temp_directory'), current_setting('memory_limit')"
        ).fetchone()
    assert row is not None and row[0] == "" and row[1].startswith("28")  # 286.1 MiB
    with pytest.raises(duckdb.OutOfMemoryException):
        catalog.query(
            "SELECT count(*) FROM (SELECT r, repeat('x', 200) || r::VARCHAR AS s"
            " FROM range(5000000) t(r) ORDER BY s DESC)"
        )


def test_a_long_query_is_stopped_at_the_reader_timeout(
    analyst_home: tuple[Path, dict[str, str], PostgresServer | None, str | None],
) -> None:
    """A reader holds the DuckDB file's lock: a query that runs on is interrupted, so a
    notebook cannot keep a flow's writer waiting."""
    _, env, _, _ = analyst_home
    started = time.monotonic()
    code, out = run_sql(
        {**env, "DROPVAULT_READER_TIMEOUT_SECONDS": "1"},
        "SELECT count(*) FROM range(100000000000) a",
    )
    assert code == 1 and "ran past 1 s" in out, out
    assert time.monotonic() - started < 30


def test_connection_itself_is_confined_without_the_guard(
    analyst_home: tuple[Path, dict[str, str], PostgresServer | None, str | None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Below the statement check, the connection refuses files and writes on its own."""
    root, env, _, _ = analyst_home
    use_env(monkeypatch, env)
    catalog = Settings.load().reader_catalog()
    with catalog._connect(read_only=True) as con:
        for query in (
            f"SELECT * FROM read_blob('{root}/keys/kek.key')",
            f"COPY (SELECT 1) TO '{root}/x.csv'",
            "SET enable_external_access = true",
            "DELETE FROM instances",
        ):
            with pytest.raises(duckdb.Error):
                con.execute(query)
    assert not (root / "x.csv").exists()


def test_ducklake_reader_role_with_select_only(
    tmp_path: Path, postgres: PostgresServer, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SELECT-only PostgreSQL role for readers (DROPVAULT_CATALOG_READER_URL): analyst
    queries work; a passthrough, even past the guard, cannot write."""
    lake = lake_factory(postgres, moto_endpoint)()
    env = {
        "DROPVAULT_HOME": str(tmp_path / "h"),
        "DROPVAULT_CATALOG_URL": "ducklake:postgres:" + lake.metadata,
        "DROPVAULT_CATALOG_DATA_URL": lake.data_url,
        "DROPVAULT_CATALOG_SCHEMA": lake.schema or "",
        "DROPVAULT_S3_ENDPOINT_URL": moto_endpoint,
        "DROPVAULT_S3_KEY": "foo",
        "DROPVAULT_S3_SECRET": "foo",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    populate(Settings.load())
    role = f"reader_{lake.schema}"
    postgres.psql(
        f"CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA {lake.schema} TO {role};"
        f" GRANT SELECT ON ALL TABLES IN SCHEMA {lake.schema} TO {role}"
    )
    reader_conninfo = lake.metadata.replace(f"user={postgres.user}", f"user={role}")
    monkeypatch.setenv("DROPVAULT_CATALOG_READER_URL", "ducklake:postgres:" + reader_conninfo)
    env["DROPVAULT_CATALOG_READER_URL"] = "ducklake:postgres:" + reader_conninfo
    code, out = run_sql(env, "SELECT count(*) AS n FROM instances", "--json")
    assert code == 0 and json.loads(out) == [{"n": 3}], out
    dump = schema_dump(postgres, lake.schema)
    catalog = Settings.load().reader_catalog()
    with catalog._connect(read_only=True) as con:
        meta = f"__ducklake_metadata_{'lake'}"
        with pytest.raises(duckdb.Error):
            con.execute(
                f"CALL postgres_execute('{meta}', 'DELETE FROM {lake.schema}.ducklake_table')"
            )
        with pytest.raises(duckdb.Error):
            con.execute(
                f"SELECT * FROM postgres_query('{meta}',"
                f" 'DELETE FROM {lake.schema}.ducklake_table RETURNING 1')"
            )
    assert schema_dump(postgres, lake.schema) == dump
