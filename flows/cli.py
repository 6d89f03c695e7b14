"""The ``dropvault`` command line.

Every command exits non-zero with a one-line ``error: ...`` message on
failure, and every ``--json`` output is a JSON array of objects, one per row.
"""

from __future__ import annotations

import base64
import functools
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import pandas as pd
import typer

from dropvault.flows import home_server
from dropvault.flows.settings import (
    Settings,
    SettingsError,
    embedded_prefect_db,
    embedded_prefect_home,
    home_server_attached,
    prefect_api_configured,
    quiet_prefect_defaults,
    server_environment,
    server_start_timeout,
    use_command_server,
    use_home_server,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
quarantine_app = typer.Typer(no_args_is_help=True, help="Review quarantined files.")
app.add_typer(quarantine_app, name="quarantine")
server_app = typer.Typer(
    no_args_is_help=True,
    help="A Prefect server kept for this home, so commands skip the temporary one's start.",
)
app.add_typer(server_app, name="server")

F = TypeVar("F", bound=Callable[..., Any])


def version_text() -> str:
    """dropvault's version and the versions that matter when reporting a problem."""
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"dropvault {of('dropvault')} (prefect {of('prefect')}, duckdb {of('duckdb')})"


@app.callback()
def _root(
    show_version: Annotated[
        bool, typer.Option("--version", help="Print the versions and exit.", is_eager=True)
    ] = False,
) -> None:
    if show_version:
        typer.echo(version_text())
        raise typer.Exit(0)


def _click_message(exc: Exception) -> str:
    """Click's own text for a usage error (it names the option), on one line."""
    format_message = getattr(exc, "format_message", None)
    text = format_message() if callable(format_message) else str(exc)
    return " ".join(str(text).split())


def one_line_errors(fn: F) -> F:
    """Turn any failure into ``error: <message>`` on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except typer.TyperException as exc:  # a bad option value: name the option
            typer.echo(f"error: {_click_message(exc)}", err=True)
            raise typer.Exit(1) from None
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


@contextmanager
def progress_bar(label: str) -> Iterator[Callable[[int, int], None]]:
    """A bar on stderr (stdout stays clean for ``--json``); ``update(done, total)``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(
        f"[bold]{label}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=not console.is_terminal,
    ) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _time_option(value: str | None, option: str) -> Any:
    """An ISO 8601 option value as a UTC datetime; a bad one names the option."""
    from dropvault.tasks.manifests import parse_time

    if value is None:
        return None
    try:
        return parse_time(value)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not an ISO 8601 date or time (for example 2026-12-01)",
            param_hint=option,
        ) from None


def _day_option(value: str | None, option: str) -> str | None:
    """A YYYY-MM-DD option value; a bad one names the option."""
    from datetime import date

    if value is None:
        return None
    try:
        return date.fromisoformat(value).isoformat()
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not a day as YYYY-MM-DD", param_hint=option
        ) from None


_flow_server: list[home_server.CommandServer] = []


def start_flow_server(settings: Settings) -> None:
    """Call before a command imports its flow. With no Prefect server named
    (``PREFECT_API_URL``) or kept for the home, start Prefect's server for this command now
    (:class:`~dropvault.flows.home_server.CommandServer`), so its start overlaps the flow's
    imports and the flow runs as its plain client. Where Prefect is already imported (a
    command called in-process, as by a test's runner) its settings are fixed, and the flow
    starts Prefect's own temporary server as before."""
    if prefect_api_configured() or "prefect" in sys.modules:
        return
    server_start_timeout()  # a wrong value fails here, before anything starts
    embedded_prefect_home(settings.home)
    server = home_server.CommandServer(settings.home, server_environment())
    use_command_server(server.url)
    _flow_server.append(server)


def flow_server_ready() -> None:
    """Call just before a command's first flow: waits for :func:`start_flow_server`'s server."""
    for server in _flow_server:
        server.wait(server_start_timeout())


def _home() -> Any:
    return Settings.load().build_home()


def _catalog() -> Any:
    """The catalog for read-only commands: the home must have been made; no key is opened."""
    return Settings.load().reader_catalog()


@app.command()
@one_line_errors
def init() -> None:
    """Make a home under DROPVAULT_HOME: its folders, KEK and pepper (or check those given)."""
    _, made = Settings.load().init_home()
    typer.echo(made)


@app.command("work-pool")
@one_line_errors
def work_pool(
    name: Annotated[str, typer.Argument(help="The pool's name (prefect.yaml uses dropvault).")] = (
        "dropvault"
    ),
) -> None:
    """Create (or lock down) the process work pool the deployments run on: no deployment or
    run can override its command, environment or working directory."""
    from dropvault.flows.work_pool import ensure_work_pool

    typer.echo(f"work pool {name}: {ensure_work_pool(name)}")


@app.command("rotate-kek")
@one_line_errors
def rotate_kek() -> None:
    """Re-wrap every record key under a new KEK (objects are untouched); safe while flows
    run, and resumed by the next start if it is killed."""
    typer.echo(Settings.load().rotate_kek())


@app.command("rotate-kms-key")
@one_line_errors
def rotate_kms_key(
    new_key_id: Annotated[str, typer.Argument(help="The KMS key to seal the KEK under from now.")],
) -> None:
    """Re-encrypt the KMS-sealed KEK under another KMS key (record keys are untouched).

    Set DROPVAULT_KEK_KMS_KEY_ID to the new key afterwards."""
    from dropvault.storage import kms

    settings = Settings.load()
    if not settings.kek_kms_key_id:
        raise SettingsError("invalid setting: DROPVAULT_KEK_KMS_KEY_ID is not set")
    settings.check_keys()  # the current blob opens and matches the home
    kms.rotate_kek(settings.kms_client(), settings.kek_kms_key_id, new_key_id, settings.keys_path)
    new = settings.model_copy(update={"kek_kms_key_id": new_key_id})
    new.check_keys()
    typer.echo(f"KEK re-encrypted under {new_key_id}: set DROPVAULT_KEK_KMS_KEY_ID to it")


@app.command()
@one_line_errors
def demo(
    reset: Annotated[
        bool,
        typer.Option("--reset", help="Empty a home an earlier demo made, then run again."),
    ] = False,
) -> None:
    """Make demo drops under DROPVAULT_HOME (default ./.dropvault) and run every flow."""
    settings = Settings.load()
    embedded_prefect_home(settings.home)
    kept = None if prefect_api_configured() else home_server.running(settings.home)
    if kept is not None:
        use_home_server(kept)  # as the other commands do (demo makes its home first)
    start_flow_server(settings)
    from dropvault.flows.demo import run_demo

    flow_server_ready()
    summary = run_demo(settings, progress=lambda msg: typer.echo(msg, err=True), reset=reset)
    for line in summary.lines():
        typer.echo(line)


@app.command()
@one_line_errors
def ingest(
    shard: Annotated[
        str | None, typer.Option(help="Take only share i of n of the drops, as 'i/n'.")
    ] = None,
) -> None:
    """Run one ingest pass over every ready drop and print its summary."""
    from dropvault.tasks.layout import ingest_has_work

    if shard is not None:
        from dropvault.tasks.layout import parse_shard

        try:
            parse_shard(shard)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--shard") from None
    settings = Settings.load()
    home = settings.build_home()
    embedded = not prefect_api_configured() or home_server_attached()
    if embedded and not ingest_has_work(home):
        # Nothing to ingest: answered without starting Prefect's temporary server, so no
        # flow run is recorded (a deployment's scheduled runs always run the flow).
        typer.echo("nothing to ingest: the drop zone is empty (no flow run started)")
        return
    start_flow_server(settings)
    from dropvault.flows.ingest import ingest_drops

    flow_server_ready()
    with progress_bar("ingest") as update:
        stats = ingest_drops(home=home, settings=settings, progress=update, shard=shard)
    for line in stats.drop_lines():  # one per drop, by keyed id (folder names can be PHI)
        typer.echo(line)
    for key, value in stats.as_dict().items():
        typer.echo(f"{key}: {value}")


@app.command()
@one_line_errors
def reconcile(
    min_age: Annotated[float | None, typer.Option(help="Only orphans older than this (s).")] = None,
) -> None:
    """Remove vault objects that have no catalog row."""
    settings = Settings.load()
    home = settings.build_home()  # refuses a home never made before anything starts
    start_flow_server(settings)
    from dropvault.flows.ingest import reconcile_vault

    flow_server_ready()
    stats = reconcile_vault(home=home, settings=settings, min_age_seconds=min_age)
    typer.echo(json.dumps(stats.__dict__))


@app.command()
@one_line_errors
def export(
    sop_instance_uid: str,
    out: Annotated[Path, typer.Option("--out", help="File to write the image to.")],
    as_user: Annotated[
        str | None,
        typer.Option("--as", help="Export as this user: only its owner or a grantee in force."),
    ] = None,
    purpose: Annotated[str, typer.Option("--purpose", help="Why (kept in the audit row).")] = "",
) -> None:
    """Decrypt one image to a file, byte-identical to what was dropped (audited). With
    --as USER, only if USER owns its study or holds a grant in force that covers it; every
    attempt is audited, refused ones too."""
    if as_user is None:
        from dropvault.tasks.exports import export_instance

        result = export_instance(_home(), sop_instance_uid, out)
    else:
        from dropvault.tasks.access import export_for

        result = export_for(_home(), as_user, sop_instance_uid, out, purpose)
    typer.echo(f"wrote {result['bytes']} bytes to {result['out']}")


@app.command()
@one_line_errors
def sql(
    query: str,
    as_json: Annotated[bool, typer.Option("--json", help="JSON array of row objects.")] = False,
) -> None:
    """Run one read-only query against the catalog (SELECT only; no file, key or other
    database is reachable: see the README's security model)."""
    _print_frame(_catalog().query(query), as_json)


@app.command()
@one_line_errors
def shares(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the diff; write and move nothing.")
    ] = False,
) -> None:
    """Apply the pending share/revoke/disclose manifests under {manifests}/shares/."""
    settings = Settings.load()
    home = settings.build_home()  # refuses a home never made before anything starts
    start_flow_server(settings)
    from dropvault.flows.sharing import apply_share_manifests

    flow_server_ready()
    result = apply_share_manifests(home=home, settings=settings, dry_run=dry_run)
    if dry_run:
        typer.echo("dry run: nothing was written or moved")
    for grant in result.added:
        typer.echo(f"+ {grant['owner']} -> {grant['grantee']} {grant['study_uid']}")
    for grant in result.revoked:
        typer.echo(f"- {grant['owner']} -> {grant['grantee']} {grant['study_uid']}")
    for manifest, rows in sorted(result.outcomes.items()):
        for row in rows:
            if row["outcome"].startswith("rejected:"):
                typer.echo(f"! {manifest} line {row['line']}: {row['outcome']}")
    typer.echo(json.dumps(result.summary()))


@app.command("access-list")
@one_line_errors
def access_list_cmd(
    owner: str,
    as_json: Annotated[bool, typer.Option("--json", help="JSON array of row objects.")] = False,
) -> None:
    """Everyone OWNER has shared with, and each grant's status (active|revoked|expired)."""
    from dropvault.tasks.sharing import access_list

    _print_frame(access_list(_catalog(), owner), as_json)


@app.command("who-can-access")
@one_line_errors
def who_can_access_cmd(
    study_uid: str,
    as_json: Annotated[bool, typer.Option("--json", help="JSON array of row objects.")] = False,
) -> None:
    """Who can access a study now: its owner and every active grant covering it."""
    from dropvault.tasks.sharing import study_exists, who_can_access

    catalog = _catalog()
    frame = who_can_access(catalog, study_uid)
    if frame.empty and not study_exists(catalog, study_uid):
        raise LookupError("no study with this UID in the catalog (never ingested, or deleted)")
    _print_frame(frame, as_json)


@app.command()
@one_line_errors
def disclosures(
    owner: str,
    since: Annotated[str | None, typer.Option(help="ISO date; default: 6 years ago.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON array of row objects.")] = False,
) -> None:
    """The accounting of disclosures made for OWNER's records."""
    from dropvault.tasks.sharing import disclosures_for

    start = _time_option(since, "--since")
    _print_frame(disclosures_for(_catalog(), owner, start), as_json)


@app.command("deliver-shares")
@one_line_errors
def deliver_shares_cmd() -> None:
    """Register grantees' keys ({manifests}/recipients/), withdraw packages whose grant
    ended, and deliver each due study to its grantee, age-encrypted, into the outbox."""
    from dropvault.flows.delivery import deliver_shares

    settings = Settings.load()
    result = deliver_shares(home=settings.build_home(), settings=settings)
    for made in result.delivered:
        typer.echo(f"+ {made['name']} ({made['files']} files, {made['bytes']} bytes)")
    typer.echo(json.dumps(result.summary()))


@app.command()
@one_line_errors
def deliveries(
    user: str,
    as_json: Annotated[bool, typer.Option("--json", help="JSON array of row objects.")] = False,
) -> None:
    """USER's packages in the outbox now, each with its object name and expiry."""
    from dropvault.tasks.delivery import deliveries_for

    _print_frame(deliveries_for(_catalog(), user), as_json)


@app.command("policy-notices")
@one_line_errors
def policy_notices_cmd(
    send: Annotated[
        bool, typer.Option("--send", help="Run the flow first: record, notify, write batches.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON array of row objects.")] = False,
) -> None:
    """Each policy version ({manifests}/policy/*.json) and how many accounts were notified."""
    from dropvault.tasks.policy import policy_versions

    if send:
        from dropvault.flows.policy import policy_notices

        settings = Settings.load()
        result = policy_notices(home=settings.build_home(), settings=settings)
        if not as_json:
            typer.echo(json.dumps(result.summary()))
    _print_frame(policy_versions(_catalog()), as_json)


@app.command("access-report")
@one_line_errors
def access_report_command(
    owner: str,
    since: Annotated[str | None, typer.Option(help="ISO date; default: everything.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON array of row objects.")] = False,
) -> None:
    """Who accessed OWNER's records, when and why: exports under grants (refused ones too),
    operator exports, grants, disclosures and incidents, oldest first."""
    from dropvault.tasks.access import access_report

    start = _time_option(since, "--since")
    _print_frame(access_report(_home(), owner, start), as_json)


@app.command()
@one_line_errors
def incident(
    user: Annotated[str, typer.Option("--user", help="The account that saw the records.")],
    study: Annotated[str, typer.Option("--study", help="The study's UID.")],
    reported_at: Annotated[
        str | None, typer.Option("--reported-at", help="ISO time of the report (default now).")
    ] = None,
) -> None:
    """Record a wrong-access report: revoke the user's grants and print the breach worksheet."""
    from datetime import UTC, datetime

    when = _time_option(reported_at, "--reported-at") or datetime.now(UTC)
    settings = Settings.load()
    home = settings.build_home()  # refuses a home never made before the flow starts
    start_flow_server(settings)
    from dropvault.flows.sharing import report_wrong_access
    from dropvault.tasks.incidents import file_incident_request

    request = file_incident_request(home.manifests, user, study, when)
    flow_server_ready()
    result = report_wrong_access(request, home=home, settings=settings)
    typer.echo(result.report_md)


@app.command()
@one_line_errors
def sweep(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print what would be deleted or archived.")
    ] = False,
) -> None:
    """Take new deletion requests and carry out every pending one (fails on an SLA breach)."""
    settings = Settings.load()
    home = settings.build_home()
    start_flow_server(settings)
    from dropvault.flows.deletion import deletion_sweep

    flow_server_ready()
    with progress_bar("sweep") as update:
        result = deletion_sweep(home=home, settings=settings, dry_run=dry_run, progress=update)
    if dry_run:
        typer.echo("dry run: nothing was deleted, written or moved")
        for item in result.planned:
            typer.echo(
                f"{item['action']} {item['request_id']}: {item['studies']} studies, "
                f"{item['instances']} instances, due {item['due_at']}"
            )
    for manifest, rows in sorted(result.intake.outcomes.items()):
        for row in rows:
            if row["outcome"].startswith("rejected:"):
                typer.echo(f"! {manifest} line {row['line']}: {row['outcome']}")
    typer.echo(json.dumps(result.summary(), default=str))


@app.command()
@one_line_errors
def deletions(
    as_json: Annotated[bool, typer.Option("--json", help="JSON array of row objects.")] = False,
) -> None:
    """Deletion requests with their SLA state (pending, at_risk, completed, breached)."""
    from dropvault.tasks.deletion import deletion_sla

    settings = Settings.load()
    _print_frame(deletion_sla(_catalog(), settings.deletion_at_risk_hours), as_json)


@app.command()
@one_line_errors
def beacons(
    day: Annotated[str | None, typer.Option(help="One day, YYYY-MM-DD.")] = None,
    since: Annotated[str | None, typer.Option(help="Every day from YYYY-MM-DD on.")] = None,
    compile_first: Annotated[
        bool, typer.Option("--compile", help="Compile pending day folders first.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON array of row objects.")] = False,
) -> None:
    """Beacon statistics per day, beacon, target and partner (suppressed cells show no count)."""
    day, since = _day_option(day, "--day"), _day_option(since, "--since")
    if compile_first:
        settings = Settings.load()
        home = settings.build_home()  # refuses a home never made before anything starts
        start_flow_server(settings)
        from dropvault.flows.beacons import compile_beacon_stats

        flow_server_ready()
        compile_beacon_stats(home=home, settings=settings)
    from dropvault.tasks.beacons import beacon_stats

    _print_frame(beacon_stats(_catalog(), since=since, day=day), as_json)


@app.command("newsletter-suppression")
@one_line_errors
def newsletter_suppression_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="JSON array of row objects.")] = False,
) -> None:
    """The mailer's suppression list (keyed hashes of addresses, never the addresses)."""
    from dropvault.tasks.beacons import newsletter_suppression

    _print_frame(newsletter_suppression(_catalog()), as_json)


@app.command()
@one_line_errors
def status(
    as_json: Annotated[bool, typer.Option("--json", help="JSON array of row objects.")] = False,
) -> None:
    """What an operator needs: each flow's last run, last failure and next run (from
    Prefect's API), drops waiting and why, pending manifests, deletion SLA, quarantine by
    reason, rows per table. ``--json``: one object per row, with its ``section``."""
    settings = Settings.load()
    home = settings.build_home()  # refuses a home never made before anything starts
    sections = {"flows": _flow_runs(settings)}
    from dropvault.tasks.status import home_status

    sections |= home_status(home, settings.quiet_seconds, settings.incomplete_seconds)
    if as_json:
        typer.echo(
            "["
            + ", ".join(
                frame_json(frame.assign(section=name)[["section", *frame.columns]])[1:-1]
                for name, frame in sections.items()
                if not frame.empty
            )
            + "]"
        )
        return
    for name, frame in sections.items():
        typer.echo(f"== {name}")
        _print_frame(frame.fillna("-"), False)


def _flow_runs(settings: Settings) -> pd.DataFrame:
    """Each flow's runs from Prefect's API, or one row saying why there are none."""
    if not prefect_api_configured() and not embedded_prefect_db(settings.home).exists():
        from dropvault.flows.runs import COLUMNS, FLOWS

        note = "no runs recorded here: no Prefect server (PREFECT_API_URL) and none embedded"
        rows = [dict.fromkeys(COLUMNS) | {"flow": f, "last_state": note} for f in FLOWS]
        return pd.DataFrame(rows, columns=list(COLUMNS), dtype=object)
    start_flow_server(settings)
    from dropvault.flows.runs import COLUMNS, flow_runs

    flow_server_ready()
    return pd.DataFrame(flow_runs(), columns=list(COLUMNS), dtype=object)


NAMES_HELP = "Also open the real folder and file names (PHI: the viewing is audited)."


@app.command("drops")
@one_line_errors
def drops_cmd(
    facility: Annotated[str | None, typer.Option(help="Only this facility's drops.")] = None,
    state: Annotated[
        str | None,
        typer.Option(help="Only drops in this state: done, partial, incomplete or waiting."),
    ] = None,
    names: Annotated[bool, typer.Option("--names", help=NAMES_HELP)] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON array of row objects.")] = False,
) -> None:
    """The drops the catalog knows and those waiting in the drop zone, by keyed id (folder
    names can hold PHI), with their state and counts."""
    import time

    from dropvault.tasks.drop_names import drops_list
    from dropvault.tasks.drops import scan_drops

    states = ("done", "partial", "incomplete", "waiting")
    if state is not None and state not in states:
        raise typer.BadParameter(
            f"{state!r} is not one of {', '.join(states)}", param_hint="--state"
        )
    settings = Settings.load()
    home = settings.build_home()
    frame = drops_list(home, names=names)
    scanned = scan_drops(
        home.drops, home.pepper, time.time(), settings.quiet_seconds,
        settings.incomplete_seconds, home.catalog,
    )  # fmt: skip
    waiting = pd.DataFrame(
        [
            {
                "facility_id": d.facility_id,
                "drop_id": d.drop_id,
                "status": "waiting",
                "files_seen": len(d.files),
                "why": d.why,
            }
            for d in scanned
            if d.state == "waiting"
        ]  # fmt: skip
    )
    if not waiting.empty:
        frame = pd.concat([waiting, frame], ignore_index=True)
    if facility is not None:
        frame = frame[frame["facility_id"] == facility]
    if state is not None:
        frame = frame[frame["status"] == state]
    _print_frame(frame, as_json)


@quarantine_app.command("list")
@one_line_errors
def quarantine_list_cmd(
    facility: Annotated[str | None, typer.Option(help="Only this facility's files.")] = None,
    drop: Annotated[str | None, typer.Option(help="Only this drop's (its keyed id).")] = None,
    reason: Annotated[str | None, typer.Option(help="Only files with this reason.")] = None,
    names: Annotated[bool, typer.Option("--names", help=NAMES_HELP)] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON array of row objects.")] = False,
) -> None:
    """List quarantined files with their reason codes (no names unless asked: they can
    hold PHI)."""
    from dropvault.tasks.quarantine import quarantine_list, quarantine_list_named
    from dropvault.tasks.reasons import QuarantineReason

    known = sorted(str(r) for r in QuarantineReason)
    if reason is not None and reason not in known:
        raise typer.BadParameter(
            f"{reason!r} is not one of {', '.join(known)}", param_hint="--reason"
        )
    if names:
        frame = quarantine_list_named(_home(), facility=facility, drop=drop, reason=reason)
    else:
        frame = quarantine_list(_catalog(), facility=facility, drop=drop, reason=reason)
    _print_frame(frame, as_json)


@quarantine_app.command("release")
@one_line_errors
def quarantine_release_cmd(quarantine_id: str) -> None:
    """Put a quarantined file back for ingest once its cause is fixed (audited): it becomes
    a drop of its own, {facility}/released-<id>/, which the next ingest pass takes."""
    from datetime import UTC, datetime

    from dropvault.tasks.quarantine import quarantine_release

    result = quarantine_release(_home(), quarantine_id, datetime.now(UTC))
    typer.echo(f"released {result['quarantine_id']} to {result['released_to']}/")


@quarantine_app.command("purge")
@one_line_errors
def quarantine_purge_cmd(
    older_than: Annotated[
        int,
        typer.Option("--older-than", min=1, help="Shred files quarantined more than N days ago."),
    ],
) -> None:
    """Shred quarantined files older than N days (key, bytes and name; the PHI-free row
    stays and says so). Audited."""
    from datetime import UTC, datetime

    from dropvault.tasks.quarantine import expire_quarantine

    n = expire_quarantine(_home(), datetime.now(UTC), older_than, actor="operator")
    typer.echo(f"shredded {n} quarantined file(s) older than {older_than} days")


@quarantine_app.command("export")
@one_line_errors
def quarantine_export_cmd(
    quarantine_id: str,
    out: Annotated[Path, typer.Option("--out", help="File to write the original bytes to.")],
) -> None:
    """Decrypt a quarantined file for review."""
    from dropvault.tasks.quarantine import quarantine_export

    result = quarantine_export(_home(), quarantine_id, out)
    typer.echo(f"wrote {result['out']}")


@server_app.command("start")
@one_line_errors
def server_start() -> None:
    """Start (or find) the home's kept Prefect server; later commands run against it."""
    home = Settings.load().home
    typer.echo(f"home server: {home_server.start(home, server_environment())}")


@server_app.command("stop")
@one_line_errors
def server_stop() -> None:
    """Stop the home's kept Prefect server."""
    stopped = home_server.stop(Settings.load().home)
    typer.echo("home server stopped" if stopped else "no home server was running")


@server_app.command("status")
@one_line_errors
def server_status() -> None:
    """Whether the home's kept Prefect server runs, and where."""
    url = home_server.running(Settings.load().home)
    typer.echo(f"home server: {url}" if url else "no home server running")


# Commands that run flows or read their runs: with no Prefect server configured they use
# the home's own embedded one (as ``demo`` does), so ``status`` sees what they ran.
RUNS_FLOWS = {"ingest", "reconcile", "shares", "incident", "sweep", "beacons", "status"}


def runs_under_home(settings: Settings) -> None:

    from dropvault.storage.home import HomeRecord

    try:
        made = HomeRecord.read(settings.home.resolve()) is not None
    except Exception:  # noqa: BLE001 - a damaged record: the command itself says so, in one line
        return
    if prefect_api_configured() or not made:
        return
    embedded_prefect_home(settings.home)
    url = home_server.running(settings.home)
    if url is not None:
        use_home_server(url)


def main() -> None:
    args = sys.argv[1:]
    if "--version" in args:  # works even where the settings are wrong
        typer.echo(version_text())
        return
    if not args or "--help" in args or "-h" in args:
        app()  # help, too, is shown whatever the settings
        return
    quiet_prefect_defaults()
    try:
        settings = Settings.load()  # a wrong setting fails here, before any flow starts
        if args[0] in RUNS_FLOWS:
            runs_under_home(settings)
        code = app(standalone_mode=False)
    except SettingsError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except typer.TyperException as exc:  # usage errors too: one line, exit 1
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            typer.echo(ctx.get_help())  # a command group with no command: its help
            sys.exit(0)
        where = ctx.command_path if ctx is not None else "dropvault"
        typer.echo(f"error: {_click_message(exc)} (see: {where} --help)", err=True)
        sys.exit(1)
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
