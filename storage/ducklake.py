"""The DuckLake backend of the catalog: metadata in PostgreSQL, data as Parquet files.

Why the extensions load from wheels: DuckDB's ``INSTALL`` fetches extensions from
the network, which production workers and CI machines may not reach. The PyPI
wheels ``duckdb-extension-ducklake``, ``-postgres-scanner`` and ``-httpfs`` at the
exact DuckDB version (1.5.5, pinned in ``pyproject.toml``) carry the binaries
under ``extensions/v<version>/``, so :func:`load_extensions` ``LOAD``\\ s them by
path, with autoinstall and autoload turned off: no step can reach the network.

What DuckLake lacks and how the catalog copes (``storage/catalog.py``):

* no PRIMARY KEY, UNIQUE or index: :func:`portable_sql` strips them from the
  migrations (one copy of the SQL); inserts that must not double go through an
  anti-join on the key columns, which are read from the migrations themselves;
* snapshot isolation with automatic retry of non-conflicting commits: two commits
  that each read, then insert, could both succeed on stale reads. Every catalog
  write bumps the one row of ``catalog_writes`` (migration 007), so two writes
  that overlap always conflict and the later one reruns on fresh data;
* deleted rows stay in old Parquet files, inlined rows and snapshots until the
  maintenance calls in :func:`compact` rewrite, expire and clean them up.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import duckdb
import fsspec

from dropvault.storage.errors import DropvaultError
from dropvault.storage.locations import Location

# package name on PyPI (import name) -> extension name
EXTENSIONS = {
    "duckdb_extension_postgres_scanner": "postgres_scanner",
    "duckdb_extension_httpfs": "httpfs",
    "duckdb_extension_ducklake": "ducklake",
}
ALIAS = "lake"  # the name the lake is attached under in every connection


class LakeSetupError(DropvaultError, RuntimeError):
    """The lake cannot be opened: an extension, the metadata server or the data path."""


@dataclass(frozen=True)
class Lake:
    """Where a DuckLake catalog lives.

    ``metadata`` is a libpq connection string (``dbname=... host=... user=...``);
    a password is best given as ``PGPASSWORD`` so it never sits in a URL.
    ``data_url`` is ``s3://bucket/prefix/`` in production, ``file://`` in a test.
    ``schema`` puts the metadata tables in their own PostgreSQL schema.
    """

    metadata: str
    data_url: str
    s3: dict[str, Any] = field(default_factory=dict)  # fsspec/s3fs storage options
    schema: str | None = None
    # Readers' libpq connection string: a PostgreSQL role with SELECT only (README,
    # "Confinement"). None: readers use ``metadata``, still attached READ_ONLY.
    reader_metadata: str | None = None

    def __repr__(self) -> str:
        return f"Lake({redact(self.metadata)!r}, {self.data_url!r})"


def redact(conninfo: str) -> str:
    return re.sub(r"(password\s*=\s*)\S+", r"\1***", conninfo)


def extension_path(package: str, name: str) -> Path:
    version = duckdb.__version__
    try:
        root = resources.files(package)
    except ModuleNotFoundError as exc:
        raise LakeSetupError(
            f"the DuckLake catalog needs the wheel {package.replace('_', '-')}=={version}"
            " (pip install 'dropvault[lake]')"
        ) from exc
    path = Path(str(root)) / "extensions" / f"v{version}" / f"{name}.duckdb_extension"
    if not path.exists():
        raise LakeSetupError(f"{path.name} for DuckDB {version} is not in {package}")
    return path


def load_extensions(con: duckdb.DuckDBPyConnection) -> None:
    for package, name in EXTENSIONS.items():
        con.execute(f"LOAD '{extension_path(package, name)}'")


def _s3_secret(con: duckdb.DuckDBPyConnection, options: dict[str, Any]) -> None:
    """An in-memory S3 secret for httpfs, built from the same options s3fs gets."""
    parts = ["TYPE s3", "PROVIDER config"]
    params: list[str] = []
    if options.get("key"):
        parts.append("KEY_ID ?")
        params.append(options["key"])
    if options.get("secret"):
        parts.append("SECRET ?")
        params.append(options["secret"])
    region = (options.get("client_kwargs") or {}).get("region_name")
    if region:
        parts.append("REGION ?")
        params.append(region)
    endpoint = options.get("endpoint_url")
    if endpoint:
        split = urlsplit(endpoint)
        parts += ["ENDPOINT ?", "URL_STYLE 'path'", f"USE_SSL {split.scheme == 'https'}"]
        params.append(split.netloc)
    # CREATE SECRET takes no prepared parameters: quote the literals ourselves.
    sql = "CREATE OR REPLACE SECRET dropvault_s3 (" + ", ".join(parts) + ")"
    for value in params:
        sql = sql.replace("?", _literal(str(value)), 1)
    con.execute(sql)


def _literal(value: str) -> str:
    """A SQL string literal (ATTACH takes no prepared parameters)."""
    return "'" + value.replace("'", "''") + "'"


def _data_path(data_url: str) -> str:
    scheme = urlsplit(data_url).scheme
    path = urlsplit(data_url).path if scheme == "file" else data_url
    return path.rstrip("/") + "/"


def open_lake(
    lake: Lake, attempts: int = 10, read_only: bool = False, memory_limit: str = "4GB"
) -> duckdb.DuckDBPyConnection:
    """A new in-memory DuckDB with the lake attached as ``lake`` and in use.

    ``read_only``: attached READ_ONLY with the readers' role, then confined: no file or URL
    but the lake's own data path, and a locked configuration (``storage/confinement.py``).

    The first ATTACH of a new lake creates its metadata tables. Two workers starting
    together both try, and one fails ("Failed to initialize DuckLake"); it tries again
    and finds the lake made.
    """
    for attempt in range(1, attempts + 1):
        try:
            return _attach(lake, read_only, memory_limit)
        except LakeSetupError as exc:
            if "Failed to initialize" not in str(exc) or attempt == attempts:
                raise
            time.sleep(0.1 * attempt * (1 + random.random()))  # noqa: S311 - jitter
    raise AssertionError("unreachable")


def _attach(
    lake: Lake, read_only: bool = False, memory_limit: str = "4GB"
) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(
        config={"autoinstall_known_extensions": False, "autoload_known_extensions": False}
    )
    try:
        load_extensions(con)
        if urlsplit(lake.data_url).scheme in ("s3", "s3a"):
            _s3_secret(con, lake.s3)
        data_path = _data_path(lake.data_url)
        options = [f"DATA_PATH {_literal(data_path)}"]
        if lake.schema:
            options.append(f"METADATA_SCHEMA {_literal(lake.schema)}")
        metadata = lake.metadata
        if read_only:
            options.append("READ_ONLY")
            metadata = lake.reader_metadata or lake.metadata
        target = _literal("ducklake:postgres:" + metadata)
        con.execute(f"ATTACH {target} AS {ALIAS} ({', '.join(options)})")
        con.execute(f"USE {ALIAS}")
        if read_only:
            # Order matters: the allowed path first, then no other access, then the lock.
            con.execute(f"SET allowed_directories = [{_literal(data_path)}]")
            con.execute("SET temp_directory = ''")  # no spill files in the data path
            con.execute(f"SET memory_limit = {_literal(memory_limit)}")
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
    except duckdb.Error as exc:
        con.close()
        # The first line only: DuckDB's messages can carry the connection string.
        first = redact(str(exc).splitlines()[0])
        raise LakeSetupError(f"cannot open the DuckLake catalog {lake!r}: {first}") from exc
    return con


_PK_INLINE = re.compile(r"\s+PRIMARY KEY\b(?!\s*\()", re.IGNORECASE)
_PK_CLAUSE = re.compile(r",\s*PRIMARY KEY\s*\([^)]*\)", re.IGNORECASE)
_INDEX = re.compile(r"CREATE\s+(UNIQUE\s+)?INDEX\b[^;]*;", re.IGNORECASE)


def portable_sql(sql: str) -> str:
    """A migration as DuckLake takes it: no PRIMARY KEY, UNIQUE or index."""
    sql = _INDEX.sub("", sql)
    sql = _PK_CLAUSE.sub("", sql)
    return _PK_INLINE.sub("", sql)


def compact(con: duckdb.DuckDBPyConnection) -> None:
    """Make deleted rows leave every file: flush inlined rows, rewrite data files that
    carry deletes, expire every older snapshot, then delete the files no snapshot uses."""
    con.execute(f"CALL ducklake_flush_inlined_data('{ALIAS}')")
    con.execute(f"CALL ducklake_rewrite_data_files('{ALIAS}', delete_threshold => 0)")
    con.execute(f"CALL ducklake_expire_snapshots('{ALIAS}', older_than => now())")
    con.execute(f"CALL ducklake_cleanup_old_files('{ALIAS}', cleanup_all => true)")
    con.execute(f"CALL ducklake_delete_orphaned_files('{ALIAS}', cleanup_all => true)")


def data_location(lake: Lake) -> Location:
    scheme = urlsplit(lake.data_url).scheme or "file"
    options = lake.s3 if scheme in ("s3", "s3a") else {}
    fs = fsspec.filesystem(scheme, skip_instance_cache=True, **options)
    return Location(_data_path(lake.data_url), fs=fs)


def vacuum_metadata(lake: Lake) -> None:
    """After :func:`compact`: ``VACUUM FULL`` every metadata table of the lake, so the
    deleted rows' dead tuples leave PostgreSQL's heap files (each table is rewritten; the
    old file is truncated at once). PostgreSQL's WAL still holds them until it recycles its
    segments (README, "Deletion"). Column statistics are refreshed and, for a superuser,
    ``pg_statistic`` rewritten. Needs ``psycopg`` (the ``lake`` extra): VACUUM cannot
    run inside the transaction DuckDB's postgres extension opens."""
    import psycopg  # local: only DuckLake catalogs need it
    from psycopg import sql

    schema = lake.schema or "public"
    try:
        with psycopg.connect(lake.metadata, autocommit=True) as pg:
            tables = pg.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = %s", [schema]
            ).fetchall()
            for (table,) in tables:
                # ANALYZE too: column statistics (pg_statistic) keep sample values.
                pg.execute(
                    sql.SQL("VACUUM (FULL, ANALYZE) {}").format(sql.Identifier(schema, table))
                )
            # The statistics the ANALYZE replaced are dead tuples of pg_statistic: only a
            # superuser can rewrite it (for others PostgreSQL skips it with a warning, and
            # autovacuum reclaims the space later).
            pg.execute("VACUUM FULL pg_catalog.pg_statistic")
    except psycopg.Error as exc:
        first = redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise LakeSetupError(f"cannot vacuum the metadata of {lake!r}: {first}") from exc


def data_files(lake: Lake) -> Iterator[tuple[str, bytes]]:
    """Every file under the data path, with its bytes; on a versioned bucket every older
    version too (a deleted row's bytes in a replaced Parquet file are still stored)."""
    location = data_location(lake)
    fs = location.fs
    if not fs.exists(location.root):
        return
    for path in fs.find(location.root):
        yield path, fs.cat_file(path)
    for path, version, marker in location.old_versions():
        if not marker:
            yield f"{path}?versionId={version}", location.read_version(path, version)


def purge_old_versions(lake: Lake) -> int:
    """After :func:`compact`: the lake keeps its own history (snapshots), so no older
    version of a data file (a rewritten or deleted Parquet file) stays on a versioned
    bucket; returns how many versions and delete markers were removed."""
    return data_location(lake).purge_old_versions()


def metadata_text(con: duckdb.DuckDBPyConnection, lake: Lake) -> Iterator[tuple[str, bytes]]:
    """Every metadata table in PostgreSQL, rendered as text (what a dump would hold)."""
    try:
        con.execute(f"ATTACH {_literal(lake.metadata)} AS lake_meta (TYPE postgres, READ_ONLY)")
    except duckdb.Error as exc:
        first = redact(str(exc).splitlines()[0])
        raise LakeSetupError(f"cannot read the metadata of {lake!r}: {first}") from exc
    try:
        schema = lake.schema or "public"
        tables = con.execute(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_catalog = 'lake_meta' AND table_schema = ?",
            [schema],
        ).fetchall()
        for (table,) in tables:
            rows = con.execute(f'SELECT * FROM lake_meta."{schema}"."{table}"').fetchall()  # noqa: S608
            yield table, repr(rows).encode()
    finally:
        con.execute("DETACH lake_meta")
