"""What an operator watches over time, as tables for the operations notebook: ingest volume
per facility, drop latency, quarantine rate per facility and reason, and the deletion SLA.
Read-only, PHI-free (facilities and keyed ids only)."""

from __future__ import annotations

import pandas as pd

from dropvault.storage.catalog import Catalog


def ingest_volume(catalog: Catalog) -> pd.DataFrame:
    """Images and bytes ingested per facility and day."""
    return catalog.query(
        "SELECT CAST(ingested_at AS DATE) AS day, facility_id, count(*) AS images,"
        " sum(size_bytes) AS bytes FROM instances GROUP BY ALL ORDER BY ALL"
    )


def drop_latency(catalog: Catalog) -> pd.DataFrame:
    """Per finished drop: seconds from the first pass that saw it to its last file
    cataloged (``completed_at``), with its facility and day."""
    return catalog.query(
        "SELECT facility_id, drop_id, CAST(first_seen_at AS DATE) AS day,"
        " epoch(completed_at) - epoch(first_seen_at) AS seconds, files_seen"
        " FROM drops WHERE completed_at IS NOT NULL ORDER BY first_seen_at"
    )


def quarantine_rate(catalog: Catalog) -> pd.DataFrame:
    """Per facility and reason: files quarantined, and their share of the files the
    facility's drops held (ingested, duplicates and quarantined)."""
    return catalog.query(
        "WITH seen AS (SELECT facility_id, sum(files_seen) AS files FROM drops GROUP BY 1)"
        " SELECT q.facility_id, q.reason, count(*) AS files,"
        " round(count(*) / greatest(max(seen.files), 1), 4) AS rate"
        " FROM quarantine q LEFT JOIN seen USING (facility_id) GROUP BY ALL ORDER BY ALL"
    )


def deletion_sla_history(catalog: Catalog) -> pd.DataFrame:
    """Per day a deletion was requested: requests, those completed, the slowest in hours,
    and how many missed their 24-hour due time."""
    return catalog.query(
        "SELECT CAST(requested_at AS DATE) AS day, count(*) AS requests,"
        " count(completed_at) AS completed,"
        " round(max(epoch(coalesce(completed_at, now())) - epoch(requested_at)) / 3600, 2)"
        " AS slowest_hours,"
        " count(*) FILTER (WHERE coalesce(completed_at, now()) > due_at) AS late"
        " FROM deletion_sla GROUP BY ALL ORDER BY ALL"
    )
