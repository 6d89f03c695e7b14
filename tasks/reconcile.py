"""Reconcile the vault with the catalog: an object with no catalog row is an orphan.

Orphans come from a run that stopped between writing an object and committing
its row. Only objects older than ``min_age_seconds`` are removed, so a run
still in flight elsewhere keeps the objects it is about to commit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NO_CACHE

from storage.home import Home
from storage.locations import Location


@dataclass
class ReconcileStats:
    vault_checked: int = 0
    vault_orphans_removed: int = 0
    quarantine_checked: int = 0
    quarantine_orphans_removed: int = 0


def _orphans(
    location: Location, known: set[str], min_age: float, now: float
) -> tuple[int, list[str]]:
    entries = location.list()
    names = {e.name for e in entries}
    orphans = []
    for entry in entries:
        if entry.name.rsplit("/", 1)[-1].startswith(".tmp-"):
            if now - entry.mtime >= min_age:
                orphans.append(entry.name)
            continue
        if entry.name.endswith(".json"):
            # A quarantine reason file belongs to the object beside it.
            sibling = entry.name[: -len(".json")] + ".dvlt"
            if sibling not in known and sibling not in names and now - entry.mtime >= min_age:
                orphans.append(entry.name)
            continue
        if entry.name not in known and now - entry.mtime >= min_age:
            orphans.append(entry.name)
            json_name = entry.name[: -len(".dvlt")] + ".json"
            if json_name in names:
                orphans.append(json_name)
    return len(entries), sorted(set(orphans))


def reconcile_vault(home: Home, min_age_seconds: float = 3600.0) -> ReconcileStats:
    """Remove vault and quarantine objects that no catalog row names."""
    now = time.time()
    stats = ReconcileStats()
    rows = home.catalog.query("SELECT kind, location_url, name FROM objects")
    for kind, location, attr in (
        ("instance", home.vault, "vault"),
        ("quarantine", home.quarantine, "quarantine"),
    ):
        known = set(
            rows.loc[(rows["kind"] == kind) & (rows["location_url"] == location.url), "name"]
        )
        checked, orphans = _orphans(location, known, min_age_seconds, now)
        for name in orphans:
            location.delete(name, unchecked=True)
        setattr(stats, f"{attr}_checked", checked)
        setattr(stats, f"{attr}_orphans_removed", len(orphans))
    return stats


reconcile_vault_task = task(
    name="reconcile-vault", retries=2, retry_delay_seconds=[1, 5], cache_policy=NO_CACHE
)(reconcile_vault)
