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
   syntax tree names no passthrough or file function (``postgres_query``,
   ``query``, ``read_*`` ...), no DuckLake metadata database and no file path
   as a table. This closes what the configuration cannot: a DuckLake
   attachment brings ``postgres_query`` on the metadata server, and the data
   path is writable by ``COPY``.
"""

from __future__ import annotations

import json
from typing import Any

import duckdb

READER_CONFIG: dict[str, Any] = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "lock_configuration": True,
}

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
)
METADATA_CATALOG_PREFIX = "__ducklake_metadata"


class QueryRefused(ValueError):
    """A reader was asked to run something other than one read-only query of the catalog."""


ONE_QUERY = "dropvault sql runs one read-only query"


def _names(tree: Any, functions: set[str], tables: set[tuple[str, str]]) -> None:
    if isinstance(tree, dict):
        name = tree.get("function_name")
        if isinstance(name, str):
            functions.add(name.lower())
        if tree.get("type") == "BASE_TABLE":
            tables.add((str(tree.get("catalog_name") or ""), str(tree.get("table_name") or "")))
        for value in tree.values():
            _names(value, functions, tables)
    elif isinstance(tree, list):
        for value in tree:
            _names(value, functions, tables)


def check_query(con: duckdb.DuckDBPyConnection, query: str) -> str:
    """The one SELECT statement in ``query``, or :class:`QueryRefused` saying why not."""
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
    functions: set[str] = set()
    tables: set[tuple[str, str]] = set()
    _names(tree, functions, tables)
    for name in sorted(functions):
        if name.startswith(DENIED_PREFIXES):
            raise QueryRefused(f"{ONE_QUERY}: {name}() reaches outside the catalog")
    for catalog, table in sorted(tables):
        if catalog.startswith(METADATA_CATALOG_PREFIX):
            raise QueryRefused(f"{ONE_QUERY}: the lake's metadata is not readable here")
        if any(c in table for c in "/\\:.") or table.startswith("~"):
            raise QueryRefused(f"{ONE_QUERY}: a file path is not a table")
    return statement.query
