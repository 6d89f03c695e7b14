"""``apply_share_manifests`` and ``report_wrong_access``: owners' grants, and incidents (P4-P6)."""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from dropvault.flows.settings import RunHome, RunSettings, for_run
from dropvault.tasks.deletion import tombstoned
from dropvault.tasks.delivery import withdraw_out_of_force
from dropvault.tasks.incidents import (
    REQUESTS,
    Incident,
    read_incident_request,
    report_incident_task,
    summary_markdown,
)
from dropvault.tasks.manifests import redact_rows, refuse_phi_in_names, uid_tokens
from dropvault.tasks.sharing import (
    ShareResult,
    apply_share_rows_task,
    archive_manifests_task,
    read_pending_task,
)


@flow(name="apply-share-manifests", validate_parameters=False)
def apply_share_manifests(
    home: RunHome = None, settings: RunSettings = None, dry_run: bool = False
) -> ShareResult:
    """Apply every pending share manifest; with ``dry_run`` report the diff and change nothing."""
    settings, home = for_run(home, settings)
    home.catalog.migrate()
    names, rows = read_pending_task(home.manifests, "shares")
    now = datetime.now(UTC)
    # A row naming a study deleted already is recorded (and archived) with its tombstone key.
    uids = uid_tokens(rows)
    deleted = tombstoned(home.catalog, home.pepper, uids)
    rows = refuse_phi_in_names(home.catalog, home.keystore, redact_rows(rows, deleted))
    result = apply_share_rows_task(home.catalog, rows, now, dry_run)
    if not dry_run:
        archive_manifests_task(home.manifests, "shares", names, result.outcomes, deleted)
        if result.revoked:
            # A revoke withdraws the grantee's packages now, not at the next delivery run.
            withdraw_out_of_force(home, now)
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
    request: str,
    home: RunHome = None,
    settings: RunSettings = None,
) -> Incident:
    """A user saw a study not theirs: trace, revoke, and write the breach worksheet (P5).

    ``request`` is the id of a report filed with
    :func:`~dropvault.tasks.incidents.file_incident_request` (the CLI's ``incident`` does
    both), so the study's UID is never a parameter Prefect stores. The worksheet goes to
    ``{manifests}/incidents/{incident_id}.md``; the artifact holds only counts and dates."""
    settings, home = for_run(home, settings)
    home.catalog.migrate()
    now = datetime.now(UTC)
    user, study_uid, reported_at = read_incident_request(home.manifests, request)
    try:
        incident = report_incident_task(home.catalog, user, study_uid, reported_at, now)
    except LookupError:
        # No such study (or deleted already): the request names a UID and goes, not kept.
        home.manifests.delete(f"{REQUESTS}/{request}.json")
        raise
    report = f"incidents/{incident.incident_id}.md"
    home.manifests.put_bytes(report, incident.report_md.encode())
    withdraw_out_of_force(home)  # the revoked grants' packages go with them
    home.manifests.move(
        f"{REQUESTS}/{request}.json", home.manifests, f"{REQUESTS}/processed/{request}.json"
    )
    create_markdown_artifact(
        key="incident-report",
        markdown=summary_markdown(incident, report),
        description=incident.incident_id,
    )
    return incident
