"""``deliver_shares``: shared studies sent to their grantees, encrypted to each, and
withdrawn when their grant ends (every 5 minutes; see :mod:`dropvault.tasks.delivery`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from dropvault.flows.settings import RunHome, RunSettings, for_run
from dropvault.storage.errors import retry_transient
from dropvault.tasks.delivery import DeliveryResult, deliver_due
from dropvault.tasks.recipients import KIND, apply_key_rows
from dropvault.tasks.sharing import archive_manifests_task, read_pending_task

apply_key_rows_task = task(
    name="apply-recipient-keys",
    retries=2,
    retry_condition_fn=retry_transient,
    retry_delay_seconds=[1, 5],
    cache_policy=NO_CACHE,
)(apply_key_rows)
# One task for the run's packages (a task run per package would cost more than most take).
deliver_due_task = task(
    name="deliver-packages",
    retries=2,
    retry_condition_fn=retry_transient,
    retry_delay_seconds=[5, 30],
    cache_policy=NO_CACHE,
)(deliver_due)


@flow(name="deliver-shares", validate_parameters=False)
def deliver_shares(home: RunHome = None, settings: RunSettings = None) -> DeliveryResult:
    """Register grantees' keys from pending recipients manifests, withdraw every package
    whose grant ended, and deliver what is due."""
    settings, home = for_run(home, settings)
    home.catalog.migrate()
    names, rows = read_pending_task(home.manifests, KIND)
    keys = apply_key_rows_task(home.catalog, rows, datetime.now(UTC))
    archive_manifests_task(home.manifests, KIND, names, keys.outcomes)
    ttl = timedelta(hours=settings.delivery_ttl_hours)
    result = deliver_due_task(home, datetime.now(UTC), ttl)
    summary = {
        "keys_applied": keys.applied,
        "keys_rejected": sum(keys.rejected.values()),
        **result.summary(),
    }
    get_run_logger().info(
        "deliveries: %s", {k: v for k, v in summary.items() if k != "withdrawn_by_reason"}
    )
    create_table_artifact(
        key="deliver-shares",
        table=[{"metric": k, "value": str(v)} for k, v in summary.items()],
        description=f"{len(names)} recipients manifest(s)",
    )
    return result
