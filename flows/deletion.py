"""``deletion_sweep``: carry out owners' deletion requests within 24 hours (promise P3)."""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from dropvault.flows.ingest import RunProgress
from dropvault.flows.settings import RunHome, RunSettings, for_run
from dropvault.storage.errors import TerminalError
from dropvault.storage.home import Home
from dropvault.tasks.deletion import (
    CatalogScanFailed,
    IntakeResult,
    SweepResult,
    compact_catalog_task,
    deletion_sla,
    dry_run_sweep,
    mark_unverified,
    open_scan_needles,
    pending_requests,
    register_requests_task,
    sweep_requests_task,
    tombstoned,
    verify_scanned,
)
from dropvault.tasks.manifests import redact_rows, refuse_phi_in_names, uid_tokens
from dropvault.tasks.quarantine import expire_quarantine_task
from dropvault.tasks.sharing import archive_manifests_task, read_pending_task


class DeletionSLABreached(TerminalError, RuntimeError):
    """A deletion request took (or is taking) longer than its 24 hours."""


class DeletionIntakeFailed(TerminalError, RuntimeError):
    """New deletion manifests could not be taken in; the pending requests were still
    carried out, and the new manifests stay in place for the next sweep."""


def _compact_and_prove(home: Home, resumed: int) -> str:
    """Compact the catalog, then scan it for every UID not yet proven gone (this run's, and
    any an earlier or killed run left, kept sealed in deletion_scans until a scan passes)."""
    needles, scan_keys, scan_requests = open_scan_needles(home)
    try:
        compacted = compact_catalog_task(home.catalog, needles, resumed=resumed)
    except CatalogScanFailed:
        # Not proven: not verified, and the next sweep compacts and scans again.
        mark_unverified(home.catalog, scan_requests, "catalog_scan")
        raise
    verify_scanned(home, scan_keys, datetime.now(UTC))
    return compacted


@flow(name="deletion-sweep", validate_parameters=False)
def deletion_sweep(
    home: RunHome = None,
    settings: RunSettings = None,
    dry_run: bool = False,
    progress: RunProgress = None,
) -> SweepResult:
    """Take new requests from ``{manifests}/deletions/`` and carry out every pending one.

    ``progress(done, total)`` is called after each batch with requests handled so far.
    """
    settings, home = for_run(home, settings, progress=progress)
    home.catalog.migrate()
    logger = get_run_logger()
    now = datetime.now(UTC)
    if dry_run:
        _, rows = read_pending_task(home.manifests, "deletions")
        return dry_run_sweep(home.catalog, rows, now)
    # Intake has its own failure boundary: requests already pending are due within 24 h
    # whatever a new manifest holds, so a failed intake must not hold them back.
    intake_failed = ""
    try:
        names, rows = read_pending_task(home.manifests, "deletions")
        # A row naming a study deleted already is recorded with its tombstone key.
        uids = uid_tokens(rows)
        gone = tombstoned(home.catalog, home.pepper, uids)
        rows = refuse_phi_in_names(home.catalog, home.keystore, redact_rows(rows, gone))
        intake = register_requests_task(home.catalog, rows, now)
        archive_manifests_task(home.manifests, "deletions", names, intake.outcomes, gone)
    except Exception as exc:  # noqa: BLE001 - reported below, after the pending ones are done
        intake_failed = type(exc).__name__  # the type only: a message may quote a row
        logger.error("deletion intake failed (%s); carrying out pending requests", intake_failed)
        intake = IntakeResult()
    pending = pending_requests(home.catalog)
    result = SweepResult(intake=intake)
    for start in range(0, len(pending), settings.sweep_batch):
        part = sweep_requests_task(home, pending.iloc[start : start + settings.sweep_batch], now)
        result.requests_done += part.requests_done
        result.studies += part.studies
        result.resumed += part.resumed
        result.request_ids += part.request_ids
        if progress:
            progress(min(start + settings.sweep_batch, len(pending)), len(pending))
    result.quarantine_expired = expire_quarantine_task(
        home, now, settings.quarantine_retention_days
    )
    result.compacted = _compact_and_prove(home, result.resumed)
    sla = deletion_sla(home.catalog, settings.deletion_at_risk_hours)
    result.sla = {str(k): int(v) for k, v in sla["sla_state"].value_counts().items()}
    create_table_artifact(
        key="deletion-sweep",
        table=[{"metric": k, "value": str(v)} for k, v in result.summary().items()],
        description="deletion sweep: requests, studies, verification and SLA",
    )
    done_now = set(pending["request_id"])
    late = sla[
        (sla["sla_state"] == "breached")
        & (sla["request_id"].isin(done_now) | sla["completed_at"].isna())
    ]
    logger.info("deletion sweep: %s", result.summary())
    if intake_failed:
        raise DeletionIntakeFailed(
            f"new deletion manifests could not be taken in ({intake_failed}); the"
            f" {result.requests_done} pending request(s) were carried out"
        )
    if len(late):
        raise DeletionSLABreached(
            f"{len(late)} deletion request(s) breached the 24 h promise: "
            + ", ".join(sorted(map(str, late["request_id"]))[:10])
        )
    return result
