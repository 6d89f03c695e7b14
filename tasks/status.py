"""One look at a home: table counts, waiting work, deletion SLA, and each flow's last run."""

from __future__ import annotations

import time
from typing import Any

from dropvault.storage.catalog import Catalog, tables
from dropvault.storage.home import Home
from dropvault.tasks.drops import scan_drops
from dropvault.tasks.manifests import pending_manifests

TABLES = tables()  # every table of the schema (storage/schema), not a list kept by hand
LAST_RUN = {
    "ingest-drops": "SELECT max(occurred_at) FROM audit_log WHERE action = 'ingest_batch'",
    "apply-share-manifests": "SELECT max(processed_at) FROM share_requests",
    "deletion-sweep": "SELECT max(received_at) FROM deletion_requests",
    "compile-beacon-stats": "SELECT max(compiled_at) FROM beacon_days",
}


def table_counts(catalog: Catalog) -> dict[str, int]:
    """Rows per catalog table (one read-only connection)."""
    reader = catalog.read_only()
    present = [t for t in TABLES if t in set(reader.tables())]
    frames = reader.many([(f"SELECT count(*) FROM {t}", None) for t in present])  # noqa: S608
    return {t: int(str(df.iloc[0, 0])) for t, df in zip(present, frames, strict=True)}


def home_status(
    home: Home, quiet_seconds: float, incomplete_seconds: float
) -> list[dict[str, Any]]:
    """Rows of ``{section, name, value}`` (values as text)."""
    rows: list[dict[str, Any]] = [
        {"section": "table", "name": t, "value": str(n)}
        for t, n in table_counts(home.catalog).items()
    ]
    reader = home.catalog.read_only()
    queries: list[tuple[str, None]] = [(q, None) for q in LAST_RUN.values()]
    queries.append(("SELECT sla_state, count(*) FROM deletion_sla GROUP BY 1 ORDER BY 1", None))
    results = reader.many(queries)
    for name, df in zip(LAST_RUN, results, strict=False):
        value = df.iloc[0, 0]
        rows.append(
            {
                "section": "last_run",
                "name": name,
                "value": "never" if value is None or str(value) == "NaT" else str(value),
            }
        )
    sla = results[-1]
    for state, count in zip(sla.iloc[:, 0], sla.iloc[:, 1], strict=True):
        rows.append({"section": "deletion_sla", "name": str(state), "value": str(count)})
    drops = scan_drops(
        home.drops, home.pepper, time.time(), quiet_seconds, incomplete_seconds, home.catalog
    )
    for state in ("ready", "waiting", "incomplete"):
        n = sum(1 for d in drops if d.state == state)
        rows.append({"section": "drops", "name": state, "value": str(n)})
    for kind in ("shares", "deletions"):
        rows.append(
            {
                "section": "manifests_pending",
                "name": kind,
                "value": str(len(pending_manifests(home.manifests, kind))),
            }
        )
    return rows
