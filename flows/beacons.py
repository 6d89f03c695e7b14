"""``compile_beacon_stats``: daily aggregates of beacon and e-mail hits, PHI-free (P7)."""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from dropvault.flows.settings import RunHome, RunSettings, for_run
from dropvault.tasks.beacon_rollups import RollupStats, compile_rollups_task
from dropvault.tasks.beacons import (
    DayStats,
    compile_day_task,
    hold_late_files_task,
    pending_days_task,
    published_days,
)


@flow(name="compile-beacon-stats", validate_parameters=False)
def compile_beacon_stats(
    home: RunHome = None, settings: RunSettings = None, day: str | None = None
) -> list[DayStats]:
    """Compile every new day folder under ``{beacons}``, or one ``day`` by name.

    A day already published is not compiled again by the scheduled pass: its late files
    are set aside under ``late/`` and counted (see :func:`dropvault.tasks.beacons.hold_late_files`).
    Naming the ``day`` compiles it again: let through when it gives the same numbers (the
    same logs), refused (``RepublishRefused``) when they would differ.
    """
    settings, home = for_run(home, settings)
    home.catalog.migrate()
    days = [day] if day else pending_days_task(home.beacons)
    published = set() if day else published_days(home.catalog)
    results = []
    for one in days:
        if one in published:
            held = hold_late_files_task(home.beacons, one)
            results.append(held)
            get_run_logger().warning("beacons %s: %d late file(s) set aside", one, held.held_late)
            continue
        stats = compile_day_task(
            home.beacons,
            home.exports,
            home.catalog,
            home.pepper,
            one,
            settings.beacon_retention,
            settings.beacon_memory_limit,
            settings.beacon_max_log_bytes,
            settings.beacon_audit_seconds,
        )
        results.append(stats)
        get_run_logger().info(
            "beacons %s: %s (audit %.2f s, %d hidden beyond the small cells)",
            one,
            stats.public_row(),
            stats.audit_seconds,
            stats.secondary,
        )
    # The artifact shows what the catalog shows: audited counters (None where hidden).
    # Weeks and months whose last day is past, audited with the days they cover.
    rollups: list[RollupStats] = compile_rollups_task(
        home.beacons, home.catalog, datetime.now(UTC).date(), settings.beacon_audit_seconds
    )
    for r in rollups:
        get_run_logger().info(
            "beacons %s from %s: %d days, %d rows, %d hidden",
            r.period,
            r.first_day,
            r.days,
            r.cells,
            r.suppressed,
        )
    create_table_artifact(
        key="beacon-stats",
        table=[s.public_row() for s in results] or [{"day": "none", "files": 0}],
        description="beacon days compiled, as published: lines, malformed, bots, cells",
    )
    return results
