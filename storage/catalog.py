"""The catalog: numbered migrations, short-lived writers, read-only readers.

Two backends behind one API and one copy of the SQL: an embedded DuckDB file (the
default), or DuckLake with its metadata in PostgreSQL and its data as Parquet on
S3 (``storage/ducklake.py``), for several workers on several machines.

DuckDB allows one writing process, and while a process holds the file
read-write no other process can open it at all (TRAPS). So:

* writers open, run one transaction, commit and close (:meth:`Catalog.write`),
  retrying while another process holds the lock or a transaction conflicts;
* readers (:meth:`Catalog.read_only`) open read-only, copy the result into
  pandas and close at once, retrying on the lock; they never hold a
  connection, so a notebook cannot block a flow.

DuckLake has no file lock: a catalog object keeps one in-memory DuckDB with the
lake attached (opening one costs ~400 ms) and gives each call its own cursor.
"""

from __future__ import annotations

import functools
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import duckdb

from dropvault.storage import ducklake
from dropvault.storage.confinement import READER_MEMORY_LIMIT, checked_query, reader_config
from dropvault.storage.ducklake import Lake
from dropvault.storage.errors import TerminalError, TransientError

if TYPE_CHECKING:  # annotations only (DuckDB imports pandas itself for .df() and params)
    import pandas as pd

T = TypeVar("T")
# First line of a migration that only a DuckDB file needs (a lake records it as applied).
DUCKDB_ONLY = "-- duckdb-only"
SERIAL_WRITES_VERSION = 7  # the migration that adds catalog_writes, which serializes writes


class QueryTimeoutError(TransientError, RuntimeError):
    """A read-only query ran past the reader timeout and was interrupted."""


class CatalogBusyError(TransientError, RuntimeError):
    """The catalog stayed locked by another process for longer than the lock timeout."""


class CatalogUnreadableError(TerminalError, RuntimeError):
    """The catalog file exists but DuckDB cannot open it (corrupt, truncated, not DuckDB)."""


class CatalogMissingError(TerminalError, FileNotFoundError):
    """The catalog file does not exist yet (no flow has written it)."""


def _is_lock_error(exc: Exception) -> bool:
    """Another process holds the file, or this process has it open the other way (DuckDB
    refuses a read-only and a read-write connection to one file in the same process)."""
    text = str(exc)
    if isinstance(exc, duckdb.ConnectionException):
        return "different configuration" in text
    return "lock" in text.lower() and isinstance(exc, duckdb.IOException)


def _is_conflict(exc: Exception) -> bool:
    return isinstance(exc, duckdb.TransactionException) or "Conflict" in str(exc)


def _rollback(con: duckdb.DuckDBPyConnection) -> None:
    """Roll back if a transaction is still open (a failed COMMIT has already ended it)."""
    with suppress(duckdb.TransactionException):
        con.execute("ROLLBACK")


def whole_uids(uids: Sequence[str]) -> re.Pattern[bytes]:
    """A bytes pattern matching any of ``uids`` as a whole UID: not preceded by a digit (or
    a digit and a dot) and not followed by one (or a dot and a digit), so a UID that is the
    prefix of a longer one, or a UID ending a sentence, is told apart."""
    olds = sorted({u.encode() for u in uids}, key=len, reverse=True)
    body = b"|".join(re.escape(o) for o in olds)
    return re.compile(rb"(?<![0-9])(?<![0-9]\.)(?:" + body + rb")(?![0-9])(?!\.[0-9])")


def migrations() -> list[tuple[int, str, str]]:
    """``(version, name, sql)`` for every file in ``storage/schema``, in order."""
    found = []
    for item in resources.files("dropvault.storage.schema").iterdir():
        if item.name.endswith(".sql"):
            version = int(item.name.split("_", 1)[0])
            found.append((version, item.name, item.read_text(encoding="utf-8")))
    return sorted(found)


@functools.cache
def _schema() -> tuple[dict[str, tuple[str, ...]], dict[str, dict[str, str]]]:
    """Each table's primary key and column types, read from the migrations themselves
    (applied to an in-memory DuckDB), so DuckLake, which has no keys, still knows them."""
    keys: dict[str, tuple[str, ...]] = {}
    with duckdb.connect() as con:
        for _, _, sql in migrations():
            con.execute(sql)
            # A key outlives its index: 008 rebuilt two tables without one (see there).
            for table, cols in con.execute(
                "SELECT table_name, constraint_column_names FROM duckdb_constraints()"
                " WHERE constraint_type = 'PRIMARY KEY'"
            ).fetchall():
                keys[table] = tuple(cols)
        columns = con.execute(
            "SELECT table_name, column_name, data_type FROM duckdb_columns() WHERE NOT internal"
        ).fetchall()
    types: dict[str, dict[str, str]] = {}
    for table, column, data_type in columns:
        types.setdefault(table, {})[column] = data_type
    return {t: keys[t] for t in types if t in keys}, types


@functools.cache
def tables() -> tuple[str, ...]:
    """Every table the migrations make (views left out), in name order: the registry that
    status and audits read instead of a list kept by hand."""
    with duckdb.connect() as con:
        for _, _, sql in migrations():
            con.execute(sql)
        found = con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE NOT internal ORDER BY 1"
        ).fetchall()
    return tuple(str(t) for (t,) in found)


def column_types() -> dict[str, dict[str, str]]:
    """``{table or view: {column: type}}`` of the schema the migrations make."""
    return _schema()[1]


def relations() -> frozenset[str]:
    """Every table and view the migrations make, lower-cased: what a reader may name."""
    return frozenset(t.lower() for t in _schema()[1]) | {"schema_migrations"}


def _indexed(con: duckdb.DuckDBPyConnection, table: str) -> bool:
    """Whether ``table`` has a primary key index here (DuckLake tables never do)."""
    row = con.execute(
        "SELECT count(*) FROM duckdb_constraints() WHERE database_name = current_database()"
        " AND table_name = ? AND constraint_type = 'PRIMARY KEY'",
        [table],
    ).fetchone()
    return bool(row and row[0])


def key_columns() -> dict[str, tuple[str, ...]]:
    """Each table's primary key columns (see :func:`_schema`)."""
    return _schema()[0]


def insert_rows(
    con: duckdb.DuckDBPyConnection,
    table: str,
    rows: Sequence[dict[str, Any]],
    *,
    ignore_existing: bool = False,
) -> int:
    """Insert dicts by column name in one statement, not row by row: each column goes in
    as one list parameter, typed from the migrations, and ``unnest`` zips them back into
    rows. (No pyarrow: pandas 3 loads it whenever it is installed, 65 MB in every worker.)"""
    if not rows:
        return 0
    types = _schema()[1][table]
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    unknown = [c for c in columns if c not in types]
    if unknown:
        raise ValueError(f"{table} has no column(s) {unknown}")
    values = [[row.get(c) for row in rows] for c in columns]
    select = "SELECT " + ", ".join(f"unnest(?::{types[c]}[]) AS {c}" for c in columns)
    verb = "INSERT INTO"
    if ignore_existing and _indexed(con, table):
        verb = "INSERT OR IGNORE INTO"  # the primary key's index does the work
    elif ignore_existing:
        # An anti-join: DuckLake tables, and the unindexed ones (008), have no index.
        keys = key_columns()[table]
        match = " AND ".join(f"t.{k} = v.{k}" for k in keys)
        select = (
            f"SELECT * FROM ({select}) v WHERE NOT EXISTS"  # noqa: S608 - names are ours
            f" (SELECT 1 FROM {table} t WHERE {match})"
            f" QUALIFY row_number() OVER (PARTITION BY {', '.join(keys)}) = 1"
        )
    con.execute(f"{verb} {table} BY NAME {select}", values)
    return len(rows)


_file_locks: dict[str, threading.RLock] = {}
_file_locks_guard = threading.Lock()


def _in_process(path: Path) -> threading.RLock:
    """One lock per catalog file for this process's threads. DuckDB shares one instance per
    file within a process, and two threads opening or closing it at once fail with "Unique
    file handle conflict" (or a read-only/read-write clash) instead of waiting."""
    key = str(path.resolve())
    with _file_locks_guard:
        return _file_locks.setdefault(key, threading.RLock())


class CatalogReader:
    """Read-only queries that return pandas DataFrames; each call opens and closes.

    Confined (``storage/confinement.py``): each query must be one SELECT that reaches the
    catalog only, on a connection that can read or write no file; anything else raises
    :class:`~dropvault.storage.confinement.QueryRefused` before it runs.
    """

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog

    def _run(
        self,
        con: duckdb.DuckDBPyConnection,
        query: str,
        params: Sequence[Any] | dict[str, Any] | None,
    ) -> pd.DataFrame:
        checked = checked_query(query, relations(), self._catalog.database_names)
        # A reader holds the DuckDB file's lock while it runs: interrupt it at the timeout, so
        # a long notebook query cannot keep a flow's writer waiting past its own timeout.
        timeout = self._catalog.reader_timeout
        timer = threading.Timer(timeout, con.interrupt)
        timer.daemon = True
        timer.start()
        try:
            return (con.execute(checked, params) if params else con.execute(checked)).df()
        except duckdb.InterruptException:
            raise QueryTimeoutError(f"the query ran past {timeout:g} s and was stopped") from None
        finally:
            timer.cancel()

    def sql(self, query: str, params: Sequence[Any] | dict[str, Any] | None = None) -> pd.DataFrame:
        return self.many([(query, params)])[0]

    def many(
        self, queries: Sequence[tuple[str, Sequence[Any] | dict[str, Any] | None]]
    ) -> list[pd.DataFrame]:
        """Several queries on one short-lived connection (one open, one close)."""
        for attempt in (1, 2):
            try:
                with self._catalog._connect(read_only=True) as con:
                    return [self._run(con, q, p) for q, p in queries]
            except duckdb.InternalException:
                # A DuckLake reader whose cached metadata predates another connection's
                # compaction fails inside the extension and invalidates its database:
                # open a fresh reader once.
                if self._catalog.lake is None or attempt == 2:
                    raise
                self._catalog.drop_reader()
        raise AssertionError("unreachable")

    def table(self, name: str) -> pd.DataFrame:
        if not name.isidentifier():
            raise ValueError("table names are identifiers")
        return self.sql(f"SELECT * FROM {name}")  # noqa: S608 - checked identifier

    def tables(self) -> list[str]:
        df = self.sql(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_catalog = current_database() ORDER BY 1"
        )
        return [str(t) for t in df["table_name"]]


class Catalog:
    """One DuckDB file, or one DuckLake. Cheap to construct.

    A DuckDB catalog holds no connection; a DuckLake one opens its lake on first use.
    """

    def __init__(
        self,
        target: Path | str | Lake,
        lock_timeout: float = 120.0,
        write_guard: Callable[[], AbstractContextManager[object]] | None = None,
        reader_memory_limit: str = READER_MEMORY_LIMIT,
        reader_timeout: float = 60.0,
    ) -> None:
        self.lake = target if isinstance(target, Lake) else None
        self._path = None if isinstance(target, Lake) else Path(target)
        self.lock_timeout = lock_timeout
        # Entered around every write connection; the flows pass a Prefect global
        # concurrency slot so writers queue on the server instead of spinning on the lock.
        self.write_guard = write_guard
        self.reader_memory_limit = reader_memory_limit  # each read-only connection's cap
        self.reader_timeout = reader_timeout  # seconds before a read-only query is stopped
        self._migrated = False
        self._db: duckdb.DuckDBPyConnection | None = None
        self._reader_db: duckdb.DuckDBPyConnection | None = None  # DuckLake, confined
        self._db_lock = threading.Lock()

    @property
    def path(self) -> Path:
        """The DuckDB file (a DuckLake catalog has none)."""
        if self._path is None:
            raise AttributeError("a DuckLake catalog has no local file")
        return self._path

    @property
    def database_names(self) -> frozenset[str]:
        """The names a query may qualify the catalog's tables with (``lake.t``, ``catalog.t``)."""
        if self.lake is not None:
            return frozenset({ducklake.ALIAS})
        return frozenset({self.path.stem.lower()})

    @property
    def backend(self) -> str:
        return "ducklake" if self.lake else "duckdb"

    def __repr__(self) -> str:
        return f"Catalog({self.lake!r})" if self.lake else f"Catalog({str(self._path)!r})"

    def __getstate__(self) -> dict[str, Any]:
        # Connections do not pickle; a copy opens its own.
        state = dict(self.__dict__)
        state["_db"] = None
        state["_reader_db"] = None
        state.pop("_db_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._db_lock = threading.Lock()

    def close(self) -> None:
        with self._db_lock:
            for db in (self._db, self._reader_db):
                if db is not None:
                    db.close()
            self._db = self._reader_db = None

    def drop_reader(self) -> None:
        """Close the DuckLake readers' connection; the next read opens a fresh one."""
        with self._db_lock:
            if self._reader_db is not None:
                with suppress(duckdb.Error):
                    self._reader_db.close()
                self._reader_db = None

    @contextmanager
    def _lake_cursor(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor on the lake: the writer's connection, or the readers' confined one."""
        assert self.lake is not None  # noqa: S101 - callers check
        with self._db_lock:
            if read_only:
                if self._reader_db is None:
                    self._reader_db = ducklake.open_lake(
                        self.lake, read_only=True, memory_limit=self.reader_memory_limit
                    )
                cursor = self._reader_db.cursor()
            else:
                if self._db is None:
                    self._db = ducklake.open_lake(self.lake)
                cursor = self._db.cursor()
        try:
            cursor.execute(f"USE {ducklake.ALIAS}")
            yield cursor
        finally:
            cursor.close()

    @contextmanager
    def _connect(self, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        if self.lake is not None:
            with self._lake_cursor(read_only) as cursor:
                yield cursor
            return
        if read_only and not self.path.exists():
            raise CatalogMissingError(f"no catalog at {self.path}: run a flow first")
        with _in_process(self.path):
            con = self._open_file(read_only)
            try:
                yield con
            finally:
                con.close()

    def _open_file(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.002  # short, capped waits: a DuckDB commit holds the lock for ~10-50 ms
        while True:
            try:
                if read_only:
                    config = reader_config(self.reader_memory_limit)
                    return duckdb.connect(str(self.path), read_only=True, config=config)
                return duckdb.connect(str(self.path))
            except (duckdb.IOException, duckdb.ConnectionException) as exc:
                if not _is_lock_error(exc):
                    raise CatalogUnreadableError(
                        f"catalog {self.path} cannot be opened"
                        f" ({str(exc).splitlines()[0]}); restore it from a backup"
                    ) from exc
                if time.monotonic() > deadline:
                    raise CatalogBusyError(
                        f"catalog {self.path.name} stayed locked for {self.lock_timeout:.0f}s"
                    ) from exc
                time.sleep(delay * (1 + random.random()))  # noqa: S311 - jitter, not crypto
                delay = min(delay * 2, 0.05)

    @contextmanager
    def _writer(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A write connection, inside the write guard when there is one."""
        guard = self.write_guard() if self.write_guard else nullcontext()
        with guard, self._connect(read_only=False) as con:
            yield con

    def fetch(
        self, queries: Sequence[tuple[str, Sequence[Any] | None]]
    ) -> list[list[tuple[Any, ...]]]:
        """Rows of the ingest's own look-ups on one read-only connection: tuples, not
        DataFrames (pandas costs ~1 ms a query). The same check and locked-down connection
        as an analyst's reader; unqualified table names only."""
        checked = [(checked_query(q, relations(), frozenset()), p) for q, p in queries]
        with self._connect(read_only=True) as con:
            return [
                con.execute(q, p).fetchall() if p else con.execute(q).fetchall() for q, p in checked
            ]

    def migrate(self, retries: int = 8) -> list[int]:
        """Apply the migrations not yet applied; returns their versions.

        Two workers starting on a new lake race here; the loser's transaction
        conflicts, and it retries and finds the work done.
        """
        if self._path is not None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(retries + 1):
            try:
                applied = self._migrate_once()
                break
            except Exception as exc:
                if not _is_conflict(exc) or attempt == retries:
                    raise
                time.sleep(0.05 * (attempt + 1) * (1 + random.random()))  # noqa: S311 - jitter
        self._migrated = True
        return applied

    def _migrate_once(self) -> list[int]:
        adapt = ducklake.portable_sql if self.lake else (lambda sql: sql)
        applied: list[int] = []
        with self._writer() as con:
            con.execute(
                adapt(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version INTEGER PRIMARY KEY, name VARCHAR, applied_at TIMESTAMPTZ)"
                )
            )
            for version, name, sql in migrations():
                if self.lake and sql.startswith(DUCKDB_ONLY):
                    sql = "SELECT 1"  # recorded as applied, nothing to do on a lake
                con.execute("BEGIN")
                try:
                    done = con.execute(
                        "SELECT count(*) FROM schema_migrations WHERE version = ?", [version]
                    ).fetchone()
                    if done and done[0]:
                        con.execute("ROLLBACK")
                        continue
                    con.execute(adapt(sql))
                    if version > SERIAL_WRITES_VERSION:
                        # A migration that changes no table (a DuckDB-only one on a lake)
                        # would not conflict with its twin, and both would record it.
                        con.execute("UPDATE catalog_writes SET writes = writes + 1")
                    con.execute(
                        "INSERT INTO schema_migrations (version, name, applied_at)"
                        " VALUES (?, ?, now())",
                        [version, name],
                    )
                    con.execute("COMMIT")
                except Exception:
                    _rollback(con)
                    raise
                applied.append(version)
        return applied

    def write(self, work: Callable[[duckdb.DuckDBPyConnection], T], retries: int = 8) -> T:
        """Run ``work(con)`` in one transaction and commit; retry on conflict.

        ``work`` must be safe to run again (it only touches the database).
        """
        if not self._migrated:
            self.migrate()
        attempt = 0
        while True:
            with self._writer() as con:
                con.execute("BEGIN")
                try:
                    # Makes any two overlapping writes conflict (migration 007).
                    con.execute("UPDATE catalog_writes SET writes = writes + 1")
                    result = work(con)
                    con.execute("COMMIT")
                    return result
                except Exception as exc:
                    _rollback(con)
                    attempt += 1
                    if not _is_conflict(exc) or attempt > retries:
                        raise
            time.sleep(0.05 * attempt)

    def simulate(self, work: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """Run ``work(con)`` in a transaction and roll it back: a dry run that writes nothing."""
        if not self._migrated:
            self.migrate()
        with self._writer() as con:
            con.execute("BEGIN")
            try:
                return work(con)
            finally:
                con.execute("ROLLBACK")

    def read_only(self) -> CatalogReader:
        return CatalogReader(self)

    def query(self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> pd.DataFrame:
        """Shorthand for ``read_only().sql(...)``."""
        return self.read_only().sql(sql, params)

    def compact(self) -> None:
        """Make the bytes of deleted rows leave every file the catalog keeps."""
        if self.lake is None:
            self.rewrite()
            return
        with self._writer() as con:
            ducklake.compact(con)
            ducklake.purge_old_versions(self.lake)
            ducklake.vacuum_metadata(self.lake)
        self.drop_reader()  # its cached metadata names files and inlined rows now gone

    def stored_files(self) -> Iterator[tuple[str, bytes]]:
        """``(name, bytes)`` of everything the catalog keeps at rest: the DuckDB file and
        its WAL; or the lake's Parquet files and the text of its metadata tables."""
        if self.lake is None:
            for path in (self.path, self.path.with_name(self.path.name + ".wal")):
                if path.exists():
                    yield str(path), path.read_bytes()
            return
        yield from ducklake.data_files(self.lake)
        with self._lake_cursor() as con:
            yield from ducklake.metadata_text(con, self.lake)

    def holds(self, needles: Sequence[str]) -> bool:
        """Whether any of ``needles`` (UIDs) is in the catalog's stored bytes (a byte scan),
        as a whole UID: ``1.2.3.40`` inside a live ``1.2.3.40.4`` does not count."""
        if not needles:
            return False
        pattern = whole_uids(needles)
        return any(pattern.search(data) for _, data in self.stored_files())

    def rewrite(self) -> None:
        """Copy the live data into a fresh file and swap it in (drops every dead block).

        Holds the write lock while copying; the swap itself is an atomic rename.
        """
        fresh = self.path.with_name(self.path.name + ".rewrite")
        fresh.unlink(missing_ok=True)
        with self._writer() as con:
            source = con.execute("SELECT current_database()").fetchone()
            where = str(fresh).replace("'", "''")
            try:
                con.execute(f"ATTACH '{where}' AS rewrite_target")
                con.execute(
                    f'COPY FROM DATABASE "{source[0] if source else self.path.stem}"'
                    " TO rewrite_target"
                )
            except BaseException:
                # A failed copy: nothing swapped in, and no half copy (which may hold rows
                # a deletion is compacting away) left attached or on disk.
                with suppress(duckdb.Error):
                    con.execute("DETACH DATABASE IF EXISTS rewrite_target")
                for leftover in (fresh, fresh.with_name(fresh.name + ".wal")):
                    leftover.unlink(missing_ok=True)
                raise
            con.execute("DETACH rewrite_target")
            con.execute("CHECKPOINT")
            fresh.replace(self.path)
        self.path.with_name(self.path.name + ".wal").unlink(missing_ok=True)

    def checkpoint(self) -> None:
        if self.lake is not None:
            return  # every DuckLake commit is already durable in PostgreSQL and Parquet
        with self._writer() as con:
            con.execute("CHECKPOINT")
