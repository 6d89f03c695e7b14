"""The ``dropvault`` command line.

Every command exits non-zero with a one-line ``error: ...`` message on
failure, and every ``--json`` output is a JSON array of objects, one per row.
"""

from __future__ import annotations

import base64
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import pandas as pd
import typer

from flows.settings import Settings, SettingsError, embedded_prefect_home, quiet_prefect_defaults

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
quarantine_app = typer.Typer(no_args_is_help=True, help="Review quarantined files.")
app.add_typer(quarantine_app, name="quarantine")

F = TypeVar("F", bound=Callable[..., Any])


def one_line_errors(fn: F) -> F:
    """Turn any failure into ``error: <message>`` on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except (SettingsError, Exception) as exc:  # noqa: BLE001 - the CLI's last line of defence
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def frame_json(df: pd.DataFrame) -> str:
    """A DataFrame as a JSON array of row objects (bytes as base64, times as ISO 8601)."""
    records = []
    for row in df.to_dict(orient="records"):
        clean: dict[str, Any] = {}
        for key, value in row.items():
            if isinstance(value, bytes | bytearray | memoryview):
                clean[str(key)] = base64.b64encode(bytes(value)).decode()
            elif isinstance(value, pd.Timestamp):
                clean[str(key)] = value.isoformat()
            elif value is None or (not isinstance(value, list | dict) and pd.isna(value)):
                clean[str(key)] = None
            elif hasattr(value, "item"):
                clean[str(key)] = value.item()
            else:
                clean[str(key)] = value
        records.append(clean)
    return json.dumps(records, default=str)


def _print_frame(df: pd.DataFrame, as_json: bool) -> None:
    if as_json:
        typer.echo(frame_json(df))
    elif df.empty:
        typer.echo("(no rows)")
    else:
        with pd.option_context("display.max_rows", 200, "display.width", 160):
            typer.echo(df.to_string(index=False))


def _home() -> Any:
    return Settings.load().build_home()


@app.command()
@one_line_errors
def demo() -> None:
    """Make demo drops under DROPVAULT_HOME (default ./.dropvault) and run every flow."""
    settings = Settings.load()
    embedded_prefect_home(settings.home)
    from flows.demo import run_demo

    summary = run_demo(settings)
    for line in summary.lines():
        typer.echo(line)


@app.command()
@one_line_errors
def ingest() -> None:
    """Run one ingest pass over every ready drop and print its summary."""
    from flows.ingest import ingest_drops

    stats = ingest_drops(settings=Settings.load())
    for key, value in stats.as_dict().items():
        typer.echo(f"{key}: {value}")


@app.command()
@one_line_errors
def reconcile(
    min_age: Annotated[float | None, typer.Option(help="Only orphans older than this (s).")] = None,
) -> None:
    """Remove vault objects that have no catalog row."""
    from flows.ingest import reconcile_vault

    stats = reconcile_vault(settings=Settings.load(), min_age_seconds=min_age)
    typer.echo(json.dumps(stats.__dict__))


@app.command()
@one_line_errors
def export(
    sop_instance_uid: str,
    out: Annotated[Path, typer.Option("--out", help="File to write the image to.")],
) -> None:
    """Decrypt one image to a file, byte-identical to what was dropped (audited)."""
    from tasks.exports import export_instance

    result = export_instance(_home(), sop_instance_uid, out)
    typer.echo(f"wrote {result['bytes']} bytes to {result['out']}")


@app.command()
@one_line_errors
def sql(
    query: str,
    as_json: Annotated[bool, typer.Option("--json", help="JSON array of row objects.")] = False,
) -> None:
    """Run a read-only SQL query against the catalog."""
    from storage.catalog import Catalog

    settings = Settings.load()
    catalog = Catalog(settings.catalog_path(), lock_timeout=settings.lock_timeout_seconds)
    _print_frame(catalog.query(query), as_json)


@quarantine_app.command("list")
@one_line_errors
def quarantine_list_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="JSON array of row objects.")] = False,
) -> None:
    """List quarantined files with their reason codes (no file names: they can hold PHI)."""
    from tasks.quarantine import quarantine_list

    _print_frame(quarantine_list(_home().catalog), as_json)


@quarantine_app.command("export")
@one_line_errors
def quarantine_export_cmd(
    quarantine_id: str,
    out: Annotated[Path, typer.Option("--out", help="File to write the original bytes to.")],
) -> None:
    """Decrypt a quarantined file for review."""
    from tasks.quarantine import quarantine_export

    result = quarantine_export(_home(), quarantine_id, out)
    typer.echo(f"wrote {result['out']}")


def main() -> None:
    quiet_prefect_defaults()
    try:
        Settings.load()  # a wrong setting fails here, before any flow starts
        app()
    except SettingsError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
