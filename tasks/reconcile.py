"""Reconcile the vault with the catalog: an object with no catalog row is an orphan.

Orphans come from a run that stopped between writing an object and committing
its row. Two passes find them:

- **Pending writes** (every ingest run). Before a batch writes anything it records
  the names it is about to write in ``{vault}/.pending/<id>.json``, and it removes
  the record once its commit has landed. A record left behind names every object a
  stopped batch may have written, so the ingest run checks only those names against
  the catalog: the cost follows the work that failed, not the size of the vault.
- **Full pass** (the daily ``reconcile-vault`` deployment). It lists the vault and the
  quarantine a group of top-level folders at a time and removes whatever no catalog row
  names, which also catches leftovers no record names (a temporary file of an
  interrupted quarantine write, or objects from before records existed).

Only records and objects older than ``min_age_seconds`` are touched, so a run still
in flight elsewhere keeps the objects it is about to commit.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NO_CACHE

from dropvault.storage.errors import retry_transient
from dropvault.storage.home import Home
from dropvault.storage.locations import Entry, Location
from dropvault.tasks.layout import PENDING


@dataclass
class ReconcileStats:
    pending_settled: int = 0
    vault_checked: int = 0
    vault_orphans_removed: int = 0
    quarantine_checked: int = 0
    quarantine_orphans_removed: int = 0


def record_pending(home: Home, vault_names: list[str], quarantine_names: list[str]) -> str | None:
    """Record the objects a batch is about to write; returns the record's name (None when
    there is nothing to write). Call it before the first write."""
    if not vault_names and not quarantine_names:
        return None
    name = f"{PENDING}/{uuid.uuid4().hex}.json"
    body = {"vault": vault_names, "quarantine": quarantine_names}
    home.vault.put_bytes(name, json.dumps(body).encode())
    return name


def clear_pending(home: Home, record: str | None) -> None:
    """Drop a batch's record once every object it names is cataloged or deleted."""
    if record is not None:
        home.vault.delete(record)


def _is_tmp(name: str) -> bool:
    return name.rsplit("/", 1)[-1].startswith(".tmp-")


def _cataloged(home: Home, location: Location, kind: str, names: list[str]) -> set[str]:
    """Those of ``names`` a catalog row claims at ``location``. A row recorded at a URL the
    home no longer has (the home was moved or restored under another path: rows keep the
    URL they were written at) claims its name at every location: reconcile never deletes
    an object because its home moved (an outside review lost a whole vault that way)."""
    if not names:
        return set()
    current = sorted({home.vault.url, home.quarantine.url, home.archive.url})
    rows = home.catalog.query(
        "SELECT name FROM objects WHERE kind = ?"
        " AND (location_url = ? OR location_url NOT IN (SELECT unnest(?::VARCHAR[])))"
        " AND name IN (SELECT unnest(?::VARCHAR[]))",
        [kind, location.url, current, names],
    )
    return set(rows["name"])


def _sibling_json(name: str) -> str:
    return name[: -len(".dvlt")] + ".json"


def _older(location: Location, names: list[str], min_age: float, now: float) -> set[str]:
    """Those of ``names`` that exist and were last written at least ``min_age`` ago."""
    folders = {name.rsplit("/", 1)[0] for name in names if "/" in name}
    entries = [e for folder in sorted(folders) for e in location.list(folder, recursive=False)]
    wanted = set(names)
    return {e.name for e in entries if e.name in wanted and now - e.mtime >= min_age}


def settle_pending(home: Home, min_age_seconds: float, now: float | None = None) -> ReconcileStats:
    """Remove what stopped batches wrote and never cataloged, then their records."""
    now = time.time() if now is None else now
    stats = ReconcileStats()
    for entry in home.vault.list(PENDING):
        if now - entry.mtime < min_age_seconds:
            continue  # a batch may still be running
        if _is_tmp(entry.name):
            home.vault.delete(entry.name, unchecked=True)  # a record cut while written
            continue
        try:
            body = json.loads(home.vault.read_bytes(entry.name))
            vault_names = [str(n) for n in body["vault"]]
            quarantine_names = [str(n) for n in body["quarantine"]]
        except (ValueError, KeyError, TypeError):
            # Unreadable: the full pass will find whatever it named.
            home.vault.delete(entry.name)
            continue
        known = _cataloged(home, home.vault, "instance", vault_names)
        for name in vault_names:
            stats.vault_checked += 1
            if name not in known:
                stats.vault_orphans_removed += home.vault.delete(name) > 0
        # A vault name is random and never written twice. A quarantine name is not: a rerun
        # may be rewriting this very object now, so only an old one is an orphan.
        old = _older(home.quarantine, quarantine_names, min_age_seconds, now)
        known = _cataloged(home, home.quarantine, "quarantine", quarantine_names)
        for name in quarantine_names:
            stats.quarantine_checked += 1
            if name in old and name not in known:
                removed = home.quarantine.delete(name) > 0
                home.quarantine.delete(_sibling_json(name))
                stats.quarantine_orphans_removed += removed
        home.vault.delete(entry.name)
        stats.pending_settled += 1
    return stats


def _orphans(entries: list[Entry], known: set[str], min_age: float, now: float) -> list[str]:
    names = {e.name for e in entries}
    orphans = []
    for entry in entries:
        if now - entry.mtime < min_age:
            continue
        if _is_tmp(entry.name):
            orphans.append(entry.name)
        elif entry.name.endswith(".json"):
            # A quarantine reason file belongs to the object beside it.
            sibling = entry.name[: -len(".json")] + ".dvlt"
            if sibling not in known and sibling not in names:
                orphans.append(entry.name)
        elif entry.name not in known:
            orphans.append(entry.name)
            if _sibling_json(entry.name) in names:
                orphans.append(_sibling_json(entry.name))
    return sorted(set(orphans))


FULL_PASS_GROUP = 50_000  # objects looked up per catalog query in the full pass


def _groups(location: Location) -> Iterator[list[Entry]]:
    """The location's objects in groups of whole top-level folders, each group closed once
    it holds ``FULL_PASS_GROUP`` objects: memory follows the group, not the vault, and a
    small vault takes one catalog query."""
    group = location.list(recursive=False)
    for folder in location.list_dirs():
        if folder == PENDING:
            continue  # records are settled on their own
        group += location.list(folder)
        if len(group) >= FULL_PASS_GROUP:
            yield group
            group = []
    yield group


def _full_pass(
    home: Home, location: Location, kind: str, min_age: float, now: float
) -> tuple[int, int]:
    """Remove what no catalog row names from one location; returns (checked, removed)."""
    checked = removed = 0
    for entries in _groups(location):
        known = _cataloged(home, location, kind, [e.name for e in entries])
        orphans = _orphans(entries, known, min_age, now)
        for name in orphans:
            location.delete(name, unchecked=True)
        checked += len(entries)
        removed += len(orphans)
    return checked, removed


def reconcile_vault(home: Home, min_age_seconds: float = 3600.0) -> ReconcileStats:
    """The full pass: settle pending records, then remove every vault and quarantine
    object that no catalog row names, a group of folders at a time."""
    now = time.time()
    stats = settle_pending(home, min_age_seconds, now)
    checked, removed = _full_pass(home, home.vault, "instance", min_age_seconds, now)
    stats.vault_checked += checked
    stats.vault_orphans_removed += removed
    checked, removed = _full_pass(home, home.quarantine, "quarantine", min_age_seconds, now)
    stats.quarantine_checked += checked
    stats.quarantine_orphans_removed += removed
    return stats


reconcile_vault_task = task(
    name="reconcile-vault",
    retries=2,
    retry_condition_fn=retry_transient,
    retry_delay_seconds=[1, 5],
    cache_policy=NO_CACHE,
)(reconcile_vault)
settle_pending_task = task(
    name="settle-pending",
    retries=2,
    retry_condition_fn=retry_transient,
    retry_delay_seconds=[1, 5],
    cache_policy=NO_CACHE,
)(settle_pending)
