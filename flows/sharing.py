"""``apply_share_manifests`` and ``report_wrong_access``: owners' grants, and incidents (P4-P6)."""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from dropvault.flows.settings import Settings
from dropvault.storage.home import Home
from dropvault.tasks.incidents import Incident, report_incident_task
from dropvault.tasks.sharing import (
    ShareResult,
    apply_share_rows_task,
    archive_manifests_task,
    read_pending_task,
)


@flow(name="apply-share-manifests", validate_parameters=False)
def apply_share_manifests(
    home: Home | None = None, settings: Settings | None = None, dry_run: bool = False
) -> ShareResult:
    """Apply every pending share manifest; with ``dry_run`` report the diff and change nothing."""
    settings = settings or Settings.load()
    home = home or settings.build_home()
    home.catalog.migrate()
    names, rows = read_pending_task(home.manifests, "shares")
    now = datetime.now(UTC)
    result = apply_share_rows_task(home.catalog, rows, now, dry_run)
    if not dry_run:
        archive_manifests_task(home.manifests, "shares", names, result.outcomes)
    summary = result.summary()
    get_run_logger().info(
        "share manifests: %s", {k: v for k, v in summary.items() if k != "rejected_by_reason"}
    )
    create_table_artifact(
        key="share-manifests-dry-run" if dry_run else "share-manifests",
        table=[{"metric": k, "value": str(v)} for k, v in summary.items()],
        description=f"{len(names)} manifest(s), {len(rows)} row(s)"
        + (" (dry run)" if dry_run else ""),
    )
    return result


@flow(name="report-wrong-access", validate_parameters=False)
def report_wrong_access(
    user: str,
    study_uid: str,
    reported_at: datetime | None = None,
    home: Home | None = None,
    settings: Settings | None = None,
) -> Incident:
    """``user`` saw a study not theirs: trace, revoke, and write the breach worksheet (P5)."""
    settings = settings or Settings.load()
    home = home or settings.build_home()
    home.catalog.migrate()
    now = datetime.now(UTC)
    incident = report_incident_task(home.catalog, user, study_uid, reported_at or now, now)
    home.manifests.put_bytes(f"incidents/{incident.incident_id}.md", incident.report_md.encode())
    create_markdown_artifact(
        key="incident-report", markdown=incident.report_md, description=incident.incident_id
    )
    return incident
