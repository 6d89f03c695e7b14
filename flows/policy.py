"""``policy_notices``: record new policy versions and compute who must be told of each
material one (see :mod:`dropvault.tasks.policy`)."""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from dropvault.flows.settings import RunHome, RunSettings, for_run
from dropvault.storage.errors import retry_transient
from dropvault.tasks.policy import PolicyResult, send_notices

send_notices_task = task(
    name="send-policy-notices",
    retries=2,
    retry_condition_fn=retry_transient,
    retry_delay_seconds=[5, 30],
    cache_policy=NO_CACHE,
)(send_notices)


@flow(name="policy-notices", validate_parameters=False)
def policy_notices(home: RunHome = None, settings: RunSettings = None) -> PolicyResult:
    """Record the policy files under {manifests}/policy/ and write each material version's
    notice batches to the outbox, each account once."""
    settings, home = for_run(home, settings)
    home.catalog.migrate()
    result = send_notices_task(home, datetime.now(UTC))
    summary = result.summary()
    get_run_logger().info(
        "policy notices: %s", {k: v for k, v in summary.items() if k != "rejected_by_reason"}
    )
    create_table_artifact(
        key="policy-notices",
        table=[{"metric": k, "value": str(v)} for k, v in summary.items()],
        description=f"{len(result.versions)} new version(s)",
    )
    return result
