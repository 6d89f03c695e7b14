"""``ingest_drops``: encrypt and catalog every ready drop; ``reconcile_vault``: remove orphans.

Both take an optional :class:`~dropvault.storage.home.Home` so a notebook or a test can
run them on its own locations; a deployment passes nothing and the home comes
from the environment through :class:`~dropvault.flows.settings.Settings`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from typing import TypeVar, cast

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.futures import PrefectFuture
from prefect.utilities.annotations import quote
from pydantic.json_schema import SkipJsonSchema

from dropvault.flows.settings import RunHome, RunSettings, Settings, for_run
from dropvault.storage.home import Home
from dropvault.tasks.archives import archive_kind, unpack_drops_task
from dropvault.tasks.drop_rekey import rekey_drops_task
from dropvault.tasks.drops import Drop, DropFile, scan_drops_task
from dropvault.tasks.ingest import (
    IngestStats,
    batches,
    finish_drops_task,
    ingest_batch_task,
    record_drops_task,
)
from dropvault.tasks.layout import in_shard, parse_shard
from dropvault.tasks.receipts import write_receipts_task
from dropvault.tasks.reconcile import ReconcileStats, reconcile_vault_task, settle_pending_task

Progress = Callable[[int, int], None]
RunProgress = SkipJsonSchema[Progress | None]  # in process only (the CLI's bar)
T = TypeVar("T")


def opaque(value: T) -> T:
    """Pass ``value`` to a task without Prefect walking it for futures (costly for a batch of
    thousands of files); the task receives it unchanged."""
    return cast(T, quote(value))


@flow(name="ingest-drops", validate_parameters=False)
def ingest_drops(
    home: RunHome = None,
    settings: RunSettings = None,
    orphan_grace_seconds: SkipJsonSchema[float | None] = None,
    progress: RunProgress = None,
    shard: str | None = None,
) -> IngestStats:
    """One ingest pass over every drop; returns (and publishes) the run's counts.

    ``progress(done, total)`` is called after each batch with files handled so far
    (the CLI draws a bar with it; deployments pass nothing). ``shard="i/n"`` takes
    only this worker's share of the drops, so n workers can split one drop zone.
    """
    if shard is not None:
        parse_shard(shard)  # a bad value fails before any work
    settings, home = for_run(
        home, settings, orphan_grace_seconds=orphan_grace_seconds, progress=progress
    )
    logger = get_run_logger()
    started = time.perf_counter()
    home.catalog.migrate()
    totals = IngestStats()
    try:
        rekeyed = rekey_drops_task(opaque(home))
    except Exception as exc:  # noqa: BLE001 - a migration's trouble must not stop ingest
        # Its message can quote a plain name: only the type is logged. Next run tries again.
        logger.error("re-keying older drop names failed (%s)", type(exc).__name__)
        rekeyed = 0
    if rekeyed:
        logger.info("moved %d drops of an older catalog to keyed ids", rekeyed)
    drops = scan_drops_task(
        home.drops,
        home.pepper,
        time.time(),
        settings.quiet_seconds,
        settings.incomplete_seconds,
        opaque(home.catalog),
    )
    drops = [d for d in drops if in_shard(d.key, shard)]
    ready = [d for d in drops if d.state != "waiting"]
    if any(archive_kind(f.name) for d in ready for f in d.files):
        # A drop whose unpacking failed comes back waiting (with why) for the next run.
        unpacked = unpack_drops_task(home.drops, opaque(ready), settings.archive_limits())
        drops = [d for d in drops if d.state == "waiting"] + unpacked
        ready = [d for d in unpacked if d.state != "waiting"]
    for drop in drops:
        if drop.state == "waiting":
            totals.drops_waiting += 1
            totals.waiting[drop.key] = drop.why
            # Drop folder names can be PHI: the log names the drop by its keyed id.
            logger.info("drop %s/%s waits: %s", drop.facility_id, drop.drop_id, drop.why)
    _run_batches(
        home, settings, [(drop, f) for drop in ready for f in drop.files], totals, progress
    )
    finished = finish_drops_task(opaque(home), opaque(ready))
    record_drops_task(opaque(home), opaque(ready), opaque(totals), finished, datetime.now(UTC))
    try:
        write_receipts_task(home.drops, opaque(drops), opaque(totals), finished)
    except Exception as exc:  # noqa: BLE001 - the images are in; a receipt must not fail the run
        logger.error("writing the facilities' receipts failed (%s)", type(exc).__name__)
    totals.drops_done = sum(finished.values())
    logger.info(
        "%d drops: %d ingested, %d duplicates, %d quarantined, %d waiting",
        len(ready),
        totals.ingested,
        totals.duplicates,
        sum(totals.quarantined.values()),
        totals.drops_waiting,
    )
    grace = settings.orphan_grace_seconds if orphan_grace_seconds is None else orphan_grace_seconds
    _settle(home, grace)
    totals.seconds = time.perf_counter() - started
    create_table_artifact(
        key="ingest-summary",
        table=totals.table(),
        description=f"ingest-drops at {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
    )
    return totals


def _run_batches(
    home: Home,
    settings: Settings,
    work: list[tuple[Drop, DropFile]],
    totals: IngestStats,
    progress: Progress | None,
) -> None:
    """Batches cut across drops: one task run and one catalog commit per batch. Several run
    at once (threads), so one batch's writes, sync, commit and unlinks overlap another's
    parse; the commit re-checks every UID, so two batches never both catalog one."""
    done = 0
    running: deque[tuple[PrefectFuture[IngestStats], int]] = deque()
    cpu_turn = threading.Lock()  # one batch parses while another writes and commits

    def collect() -> None:
        nonlocal done
        future, n = running.popleft()
        totals.add(future.result())
        done += n
        if progress:
            progress(done, len(work))

    for chunk in batches(work, settings.batch_files, settings.batch_bytes):
        if len(running) >= settings.batches_in_flight:
            collect()
        future = ingest_batch_task.submit(
            opaque(home),
            opaque(chunk),
            max_file_bytes=settings.max_file_bytes,
            cpu_turn=opaque(cpu_turn),
            cd_extras=settings.cd_extras,
        )
        running.append((future, len(chunk)))
    while running:
        collect()
    if totals.retry:
        # Files whose UID a concurrent batch cataloged first: classify them now, in this run.
        again, totals.retry = totals.retry, []
        totals.add(
            ingest_batch_task(
                opaque(home),
                opaque(again),
                max_file_bytes=settings.max_file_bytes,
                cd_extras=settings.cd_extras,
            )
        )


def _settle(home: Home, grace: float) -> None:
    """Only what stopped batches left behind (their pending records): the cost follows the
    failures, not the vault's size. The daily reconcile-vault deployment lists it all."""
    settled = settle_pending_task(home, grace)
    if settled.pending_settled:
        get_run_logger().info(
            "settled %d pending records: %d vault and %d quarantine orphans removed",
            settled.pending_settled,
            settled.vault_orphans_removed,
            settled.quarantine_orphans_removed,
        )


@flow(name="reconcile-vault", validate_parameters=False)
def reconcile_vault(
    home: RunHome = None,
    settings: RunSettings = None,
    min_age_seconds: SkipJsonSchema[float | None] = None,
) -> ReconcileStats:
    """Remove vault and quarantine objects that have no catalog row: pending records of
    stopped batches first, then a full listing, a group of top-level folders at a time.
    ``min_age_seconds`` (in process only: a deployment run uses the setting) overrides
    ``DROPVAULT_ORPHAN_GRACE_SECONDS``."""
    settings, home = for_run(home, settings, min_age_seconds=min_age_seconds)
    if min_age_seconds is not None and min_age_seconds < 0:
        raise ValueError("min_age_seconds must be 0 or more")
    home.catalog.migrate()
    grace = settings.orphan_grace_seconds if min_age_seconds is None else min_age_seconds
    stats = reconcile_vault_task(home, grace)
    create_table_artifact(
        key="reconcile-summary",
        table=[{"metric": k, "value": v} for k, v in asdict(stats).items()],
        description="vault objects checked and orphans removed",
    )
    return stats
