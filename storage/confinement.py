"""What a catalog reader may run: one read-only query, reaching the catalog and nothing else.

Two layers, both applied to every read-only connection (``dropvault sql``,
``Catalog.read_only()`` in notebooks, ``dropvault status`` and the tasks' reads):

1. **The connection is confined by DuckDB itself** (:data:`READER_CONFIG`):
   ``enable_external_access = false`` turns off every file reader and writer
   (``read_blob``, ``read_csv``, ``glob``, a quoted path in FROM, ``COPY``,
   ``EXPORT``, ``ATTACH``, ``INSTALL``/``LOAD``, ``getenv``), and
   ``lock_configuration = true`` stops a query from turning it back on. A
   DuckLake reader must still reach its own Parquet files, so there the data
   path alone is allowed (``allowed_directories``) and the lake is attached
   ``READ_ONLY``.
2. **The statement is checked before it runs** (:func:`check_query`): exactly one
   statement, of type SELECT (from DuckDB's own parser, not the text), whose
   syntax tree calls only the table functions in :data:`ALLOWED_TABLE_FUNCTIONS`
   (an allowlist: table macros such as ``histogram`` expand to ``query_table``
   after the check, and ``pandas_scan(NULL)`` or ``enable_logging`` can crash the
   process or write files), no denied scalar function (``getenv``,
   ``current_setting``, ...), no DuckLake metadata database (by any spelling) and
   no file path as a table. This closes what the configuration cannot: a DuckLake
   attachment brings ``postgres_query`` on the metadata server, and the data
   path is writable.

A reader also spills nothing to disk (``temp_directory = ''``) and has its own
memory limit, so one query cannot fill the home's disk or the machine's memory;
it fails with an out-of-memory error instead. DuckDB has no statement timeout.
"""

from __future__ import annotations

import functools
import json
import threading
from typing import Any

import duckdb

from dropvault.storage.errors import TerminalError

READER_MEMORY_LIMIT = "4GB"


def reader_config(memory_limit: str = READER_MEMORY_LIMIT) -> dict[str, Any]:
    """DuckDB configuration of every read-only connection to a DuckDB file."""
    return {
        "enable_external_access": False,
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
        "temp_directory": "",  # no spill files: a huge query fails instead of filling the disk
        "memory_limit": memory_limit,
        "lock_configuration": True,
    }


# The table functions a query may call (FROM range(10), unnest, DuckDB's own catalog views).
ALLOWED_TABLE_FUNCTIONS = frozenset(
    {
        "range",
        "generate_series",
        "unnest",
        "json_each",
        "json_tree",
        "duckdb_tables",
        "duckdb_columns",
        "duckdb_views",
        "duckdb_constraints",
        "duckdb_schemas",
        "duckdb_types",
        "duckdb_functions",
        "duckdb_keywords",
        "duckdb_indexes",
        "icu_calendar_names",
    }
)

# Functions that reach past the catalog: passthroughs to PostgreSQL, SQL hidden in a string,
# readers of files or other table formats, secrets and the environment.
DENIED_PREFIXES = (
    "postgres_",
    "pg_",
    "mysql_",
    "sqlite_",
    "read_",
    "parquet_",
    "iceberg_",
    "delta_",
    "ducklake_",
    "json_execute",
    "glob",
    "sniff_csv",
    "query",
    "getenv",
    "duckdb_secrets",
    "which_secret",
    "load_aws_credentials",
    "http_",
    "pragma_",  # PRAGMA x parses as SELECT * FROM pragma_x(): PRAGMA is not a query
    "current_setting",  # DuckLake's allowed paths can hold a connection string
    "enable_",
    "disable_",
)
METADATA_CATALOG_PREFIX = "__ducklake_metadata"


class QueryRefused(TerminalError, ValueError):
    """A reader was asked to run something other than one read-only query of the catalog."""


ONE_QUERY = "dropvault sql runs one read-only query"


class _Names:
    """Every function, table function and table a syntax tree names, lower-cased
    (DuckDB resolves names case-insensitively)."""

    def __init__(self, tree: Any) -> None:
        self.functions: set[str] = set()
        self.table_functions: set[str] = set()
        self.tables: set[tuple[str, str, str]] = set()
        self.ctes: set[str] = set()
        self.shows: set[str] = set()  # SHOW/DESCRIBE/SUMMARIZE targets ('' for a subquery)
        self._walk(tree)

    def _walk(self, tree: Any) -> None:
        if isinstance(tree, dict):
            name = tree.get("function_name")
            if isinstance(name, str):
                self.functions.add(name.lower())
            cte_map = tree.get("cte_map")
            if isinstance(cte_map, dict):
                self.ctes |= {str(e.get("key", "")).lower() for e in cte_map.get("map", [])}
            if tree.get("type") == "SHOW_REF":
                self.shows.add(str(tree.get("table_name") or "").lower())
            if tree.get("type") == "TABLE_FUNCTION":
                function = tree.get("function") or {}
                self.table_functions.add(str(function.get("function_name", "?")).lower())
            if tree.get("type") == "BASE_TABLE":
                self.tables.add(
                    tuple(  # type: ignore[arg-type]
                        str(tree.get(k) or "").lower()
                        for k in ("catalog_name", "schema_name", "table_name")
                    )
                )
            for value in tree.values():
                self._walk(value)
        elif isinstance(tree, list):
            for value in tree:
                self._walk(value)


# Of DuckDB's own views, only these (a table's columns); pg_settings, duckdb_databases and
# the like show settings and attached connection strings.
ALLOWED_SYSTEM_VIEWS = frozenset(
    {("information_schema", "tables"), ("information_schema", "columns")}
)


_parser_lock = threading.RLock()  # _system_names() runs inside checked_query()
_parser: duckdb.DuckDBPyConnection | None = None


def _parse_connection() -> duckdb.DuckDBPyConnection:
    """An empty in-memory DuckDB, only for parsing (no catalog is needed to parse)."""
    global _parser
    if _parser is None:
        _parser = duckdb.connect(config=reader_config("256MB"))
    return _parser


@functools.cache
def _system_names() -> frozenset[str]:
    """Every name DuckDB itself resolves in FROM: its views and tables (pg_settings,
    duckdb_databases, information_schema ...) and its table functions."""
    with _parser_lock:
        rows = (
            _parse_connection()
            .execute(
                "SELECT lower(view_name) FROM duckdb_views()"
                " UNION SELECT lower(table_name) FROM duckdb_tables()"
                " UNION SELECT lower(function_name) FROM duckdb_functions()"
                " WHERE function_type IN ('table', 'table_macro')"
            )
            .fetchall()
        )
    return frozenset(str(r[0]) for r in rows)


@functools.lru_cache(maxsize=1024)
def checked_query(
    query: str, relations: frozenset[str] | None = None, catalogs: frozenset[str] = frozenset()
) -> str:
    """:func:`check_query` on a private parser, remembered by query text: readers repeat the
    same texts with other parameters, and a check costs about a millisecond."""
    with _parser_lock:
        return check_query(_parse_connection(), query, relations, catalogs)


def check_query(
    con: duckdb.DuckDBPyConnection,
    query: str,
    relations: frozenset[str] | None = None,
    catalogs: frozenset[str] = frozenset(),
) -> str:
    """The one SELECT statement in ``query``, or :class:`QueryRefused` saying why not.

    ``relations``: the catalog's own tables and views; a table reference must name one of
    them (or a CTE of the query, or ``information_schema.tables``/``columns``), in the
    default schema of the default catalog or of ``catalogs``. None skips that rule."""
    try:
        statements = con.extract_statements(query)
    except duckdb.Error as exc:
        raise QueryRefused(f"{ONE_QUERY}: {str(exc).splitlines()[0]}") from None
    if len(statements) != 1:
        raise QueryRefused(f"{ONE_QUERY} (got {len(statements)} statements)")
    statement = statements[0]
    if statement.type != duckdb.StatementType.SELECT:
        raise QueryRefused(f"{ONE_QUERY} (got a {statement.type.name} statement)")
    row = con.execute("SELECT json_serialize_sql(?::VARCHAR)", [statement.query]).fetchone()
    tree = json.loads(row[0]) if row else {"error": True}
    if tree.get("error"):
        raise QueryRefused(f"{ONE_QUERY} (this form of SELECT cannot be checked)")
    _check_names(_Names(tree), relations, catalogs)
    return statement.query


def _check_names(names: _Names, relations: frozenset[str] | None, catalogs: frozenset[str]) -> None:
    # A CTE named like a system view reads the view itself in its own body (and passes the
    # name elsewhere in the query): CTEs must take new names.
    for cte in sorted(names.ctes & _system_names()):
        raise QueryRefused(f"{ONE_QUERY}: a CTE may not reuse the name {cte}")
    for shown in sorted(names.shows - {"", '"tables"'}):
        raise QueryRefused(f"{ONE_QUERY}: SHOW {shown.strip(chr(34)).upper()} is not allowed")
    for name in sorted(names.table_functions - ALLOWED_TABLE_FUNCTIONS):
        raise QueryRefused(f"{ONE_QUERY}: {name}() is not a table function readers may call")
    for name in sorted(names.functions):
        if name.startswith(DENIED_PREFIXES):
            raise QueryRefused(f"{ONE_QUERY}: {name}() reaches outside the catalog")
    for catalog, schema, table in sorted(names.tables):
        # A two-part name a.b may name catalog a: check the schema part as well.
        if catalog.startswith(METADATA_CATALOG_PREFIX) or schema.startswith(
            METADATA_CATALOG_PREFIX
        ):
            raise QueryRefused(f"{ONE_QUERY}: the lake's metadata is not readable here")
        if any(c in part for part in (catalog, schema, table) for c in "/\\:.*?"):
            raise QueryRefused(f"{ONE_QUERY}: a file path is not a table")
        if relations is not None and not _known(catalog, schema, table, relations, catalogs, names):
            raise QueryRefused(f"{ONE_QUERY}: {table} is not a table of the catalog")


def _known(
    catalog: str,
    schema: str,
    table: str,
    relations: frozenset[str],
    catalogs: frozenset[str],
    names: _Names,
) -> bool:
    if (schema, table) in ALLOWED_SYSTEM_VIEWS and catalog in ("", *catalogs):
        return True
    if not catalog and not schema and table in names.ctes:
        return True
    # a, main.a, <db>.a (two parts: DuckDB tries the schema, then the catalog), <db>.main.a
    plain = (catalog, schema) in (("", ""), ("", "main")) or (
        (not catalog and schema in catalogs) or (catalog in catalogs and schema in ("", "main"))
    )
    return plain and table in relations
