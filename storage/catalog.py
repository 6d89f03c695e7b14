"""The DuckDB catalog: numbered migrations, short-lived writers, read-only readers.

DuckDB allows one writing process, and while a process holds the file
read-write no other process can open it at all (TRAPS). So:

* writers open, run one transaction, commit and close (:meth:`Catalog.write`),
  retrying while another process holds the lock or a transaction conflicts;
* readers (:meth:`Catalog.read_only`) open read-only, copy the result into
  pandas and close at once, retrying on the lock; they never hold a
  connection, so a notebook cannot block a flow.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pandas as pd
import pyarrow as pa

T = TypeVar("T")


class CatalogBusyError(RuntimeError):
    """The catalog stayed locked by another process for longer than the lock timeout."""


class CatalogUnreadableError(RuntimeError):
    """The catalog file exists but DuckDB cannot open it (corrupt, truncated, not DuckDB)."""


class CatalogMissingError(FileNotFoundError):
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


def migrations() -> list[tuple[int, str, str]]:
    """``(version, name, sql)`` for every file in ``storage/schema``, in order."""
    found = []
    for item in resources.files("storage.schema").iterdir():
        if item.name.endswith(".sql"):
            version = int(item.name.split("_", 1)[0])
            found.append((version, item.name, item.read_text(encoding="utf-8")))
    return sorted(found)


def insert_rows(
    con: duckdb.DuckDBPyConnection,
    table: str,
    rows: Sequence[dict[str, Any]],
    *,
    ignore_existing: bool = False,
) -> int:
    """Insert dicts by column name in one statement (Arrow, not row-by-row executemany)."""
    if not rows:
        return 0
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    # from_pylist takes its columns from the first row: give every row every column.
    data = pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows])
    view = f"_rows_{table}"
    con.register(view, data)
    try:
        verb = "INSERT OR IGNORE INTO" if ignore_existing else "INSERT INTO"
        con.execute(f"{verb} {table} BY NAME SELECT * FROM {view}")  # noqa: S608 - table names are ours
    finally:
        con.unregister(view)
    return len(rows)


class CatalogReader:
    """Read-only queries that return pandas DataFrames; each call opens and closes."""

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog

    def sql(self, query: str, params: Sequence[Any] | dict[str, Any] | None = None) -> pd.DataFrame:
        with self._catalog._connect(read_only=True) as con:
            return con.execute(query, params).df() if params else con.sql(query).df()

    def many(self, queries: Sequence[tuple[str, Sequence[Any] | None]]) -> list[pd.DataFrame]:
        """Several queries on one short-lived connection (one open, one close)."""
        with self._catalog._connect(read_only=True) as con:
            return [con.execute(q, p).df() if p else con.sql(q).df() for q, p in queries]

    def table(self, name: str) -> pd.DataFrame:
        if not name.isidentifier():
            raise ValueError("table names are identifiers")
        return self.sql(f"SELECT * FROM {name}")  # noqa: S608 - checked identifier

    def tables(self) -> list[str]:
        df = self.sql("SELECT table_name FROM information_schema.tables ORDER BY 1")
        return [str(t) for t in df["table_name"]]


class Catalog:
    """One DuckDB file. Cheap to construct; holds no connection."""

    def __init__(
        self,
        path: Path | str,
        lock_timeout: float = 120.0,
        write_guard: Callable[[], AbstractContextManager[object]] | None = None,
    ) -> None:
        self.path = Path(path)
        self.lock_timeout = lock_timeout
        # Entered around every write connection; the flows pass a Prefect global
        # concurrency slot so writers queue on the server instead of spinning on the lock.
        self.write_guard = write_guard
        self._migrated = False

    def __repr__(self) -> str:
        return f"Catalog({str(self.path)!r})"

    @contextmanager
    def _connect(self, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        if read_only and not self.path.exists():
            raise CatalogMissingError(f"no catalog at {self.path}: run a flow first")
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.01
        while True:
            try:
                con = duckdb.connect(str(self.path), read_only=read_only)
                break
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
                delay = min(delay * 2, 0.5)
        try:
            yield con
        finally:
            con.close()

    @contextmanager
    def _writer(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A write connection, inside the write guard when there is one."""
        guard = self.write_guard() if self.write_guard else nullcontext()
        with guard, self._connect(read_only=False) as con:
            yield con

    def migrate(self) -> list[int]:
        """Apply the migrations not yet applied; returns their versions."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        applied: list[int] = []
        with self._writer() as con:
            con.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version INTEGER PRIMARY KEY, name VARCHAR, applied_at TIMESTAMPTZ DEFAULT now())"
            )
            done = {r[0] for r in con.execute("SELECT version FROM schema_migrations").fetchall()}
            for version, name, sql in migrations():
                if version in done:
                    continue
                con.execute("BEGIN")
                try:
                    con.execute(sql)
                    con.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (?, ?)",
                        [version, name],
                    )
                    con.execute("COMMIT")
                except Exception:
                    con.execute("ROLLBACK")
                    raise
                applied.append(version)
        self._migrated = True
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
                    result = work(con)
                    con.execute("COMMIT")
                    return result
                except Exception as exc:
                    con.execute("ROLLBACK")
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

    def rewrite(self) -> None:
        """Copy the live data into a fresh file and swap it in (drops every dead block).

        Holds the write lock while copying; the swap itself is an atomic rename.
        """
        fresh = self.path.with_name(self.path.name + ".rewrite")
        fresh.unlink(missing_ok=True)
        with self._writer() as con:
            source = con.execute("SELECT current_database()").fetchone()
            con.execute(f"ATTACH '{fresh}' AS rewrite_target")
            con.execute(
                f'COPY FROM DATABASE "{source[0] if source else self.path.stem}" TO rewrite_target'
            )
            con.execute("DETACH rewrite_target")
            con.execute("CHECKPOINT")
            fresh.replace(self.path)
        self.path.with_name(self.path.name + ".wal").unlink(missing_ok=True)

    def checkpoint(self) -> None:
        with self._writer() as con:
            con.execute("CHECKPOINT")
