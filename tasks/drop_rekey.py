"""Re-keying a catalog made before drop ids were keyed (see :mod:`dropvault.tasks.drop_names`).

Such a catalog holds drop folder names in plain text in ``drops``, ``instances``,
``quarantine``, quarantine object paths and their JSON, and ingest audit subjects.
:func:`rekey_drops` runs at the start of every ingest; once done it costs one query.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime

import duckdb
from prefect import task
from prefect.cache_policies import NO_CACHE

from dropvault.storage.catalog import insert_rows
from dropvault.storage.errors import retry_transient
from dropvault.storage.home import Home
from dropvault.storage.locations import Location, is_file_problem
from dropvault.tasks.audit import audit
from dropvault.tasks.drop_names import drop_id_for, seal_names
from dropvault.tasks.layout import LEGACY
from dropvault.tasks.quarantine import quarantine_object_name


@dataclass(frozen=True)
class _Legacy:
    facility_id: str
    name: str  # the plain drop_id such a catalog holds
    drop_id: str  # its keyed id


def rekey_drops(home: Home) -> int:
    """Give every drop a catalog made before keyed ids holds its keyed id and a sealed
    name; returns how many drops were re-keyed (0, and one cheap query, once done).

    Quarantined objects move to their keyed folder (copied first, cataloged, then the old
    copy removed, so a crash leaves at most a stray copy that reconcile removes), audit
    subjects are rewritten, and the catalog file is compacted so the plain names leave it.
    Prefect's own database keeps what older runs logged: that is outside the catalog."""
    found = home.catalog.query(LEGACY)
    if found.empty:
        return 0
    legacy = [
        _Legacy(str(f), str(n), drop_id_for(home.pepper, str(f), str(n)))
        for f, n in found.itertuples(index=False)
    ]
    moves = _move_quarantine(home, legacy)
    sealed = dict(
        zip(legacy, seal_names(home.keystore, [(i.drop_id, i.name) for i in legacy]), strict=True)
    )
    now = datetime.now(UTC)

    def work(con: duckdb.DuckDBPyConnection) -> None:
        for item, (key_id, name_enc) in sealed.items():
            where = [item.facility_id, item.name]
            con.execute(
                "UPDATE drops SET drop_id = ?, record_key_id = ?, name_enc = ?"
                " WHERE facility_id = ? AND drop_id = ?",
                [item.drop_id, key_id, name_enc, *where],
            )
            _ensure_drop_row(con, item, key_id, name_enc, now)
            for table in ("instances", "quarantine"):
                con.execute(
                    f"UPDATE {table} SET drop_id = ? WHERE facility_id = ? AND drop_id = ?",  # noqa: S608
                    [item.drop_id, *where],
                )
        if moves:
            con.executemany(
                "UPDATE objects SET name = ? WHERE object_id = ?",
                [[new, qid] for qid, (_, _, new) in moves.items()],
            )
            # A deletion in progress names the objects it must find gone.
            con.executemany(
                "UPDATE deletion_objects SET name = ? WHERE location_url = ? AND name = ?",
                [[new, url, old] for url, old, new in moves.values()],
            )
        _rekey_audit(
            con, {f"{i.facility_id}/{i.name}": f"{i.facility_id}/{i.drop_id}" for i in legacy}
        )
        audit(
            con,
            actor="migration",
            action="drops_rekeyed",
            subject=str(len(legacy)),
            detail={"quarantine_objects_moved": len(moves)},
            at=now,
        )

    home.catalog.write(work)
    _remove_old(home, moves)
    home.catalog.compact()
    return len(legacy)


def _ensure_drop_row(
    con: duckdb.DuckDBPyConnection, item: _Legacy, key_id: str, name_enc: bytes, now: datetime
) -> None:
    """A drop known only from its files (a run stopped before its drops row): a row, so its
    name is kept sealed like every other drop's."""
    row = {
        "facility_id": item.facility_id,
        "drop_id": item.drop_id,
        "has_manifest": False,
        "status": "partial",
        "first_seen_at": now,
        "record_key_id": key_id,
        "name_enc": name_enc,
    }
    insert_rows(con, "drops", [row], ignore_existing=True)


def _move_quarantine(home: Home, legacy: list[_Legacy]) -> dict[str, tuple[str, str, str]]:
    """Copy each quarantined object of a legacy drop (and its reason file, with the keyed id
    in it) to the keyed folder; returns ``{object_id: (location_url, old name, new name)}``.
    An object already gone (expired, removed by hand) is renamed in the catalog only."""
    ids = {(i.facility_id, i.name): i.drop_id for i in legacy}
    rows = home.catalog.query(
        "SELECT q.facility_id, q.drop_id, o.object_id, o.name, o.location_url FROM quarantine q"
        " JOIN objects o USING (object_id) WHERE o.kind = 'quarantine'"
    )
    moves: dict[str, tuple[str, str, str]] = {}
    for facility_id, name, object_id, old, url in rows.itertuples(index=False):
        new_id = ids.get((str(facility_id), str(name)))
        if new_id is None:
            continue
        new = quarantine_object_name(str(facility_id), new_id, str(object_id))
        if old == new:
            continue
        store = home.location_for(str(url))
        try:
            _copy(store, str(old), new, new_id)
        except FileNotFoundError:
            pass  # nothing to move; the row still loses the plain name
        except OSError as exc:
            if not is_file_problem(exc):
                raise
            continue  # cannot be read here: left for the next run
        moves[str(object_id)] = (str(url), str(old), new)
    return moves


def _copy(store: Location, old: str, new: str, new_id: str) -> None:
    with store.open(old, unchecked=True) as src:
        store.put_stream(new, src)
    facts_name = old.removesuffix(".dvlt") + ".json"
    try:
        facts = json.loads(store.read_bytes(facts_name, unchecked=True))
    except (FileNotFoundError, ValueError):
        return
    facts["drop_id"] = new_id
    store.put_bytes(new.removesuffix(".dvlt") + ".json", json.dumps(facts, indent=2).encode())


def _remove_old(home: Home, moves: dict[str, tuple[str, str, str]]) -> None:
    """The plain-named copies and their folders, once the catalog names the new ones."""
    for url, old, _new in moves.values():
        store = home.location_for(url)
        store.delete(old, unchecked=True)
        store.delete(old.removesuffix(".dvlt") + ".json", unchecked=True)
        store.rmdir_empty(old.rsplit("/", 1)[0], unchecked=True)


def _rekey_audit(con: duckdb.DuckDBPyConnection, renamed: dict[str, str]) -> None:
    """Ingest audit rows name their drops in ``subject`` (comma-separated keys)."""
    rows = con.execute(
        "SELECT event_id, subject FROM audit_log WHERE action = 'ingest_batch'"
        " AND subject IS NOT NULL"
    ).fetchall()
    # Whole keys between commas, longest first (a name may itself hold a comma).
    olds = sorted(renamed, key=len, reverse=True)
    pattern = re.compile("(^|,)(" + "|".join(re.escape(o) for o in olds) + ")(?=,|$)")
    updates = []
    for event_id, subject in rows:
        new = pattern.sub(lambda m: m.group(1) + renamed[m.group(2)], str(subject))
        if new != subject:
            updates.append([new, event_id])
    if updates:
        con.executemany("UPDATE audit_log SET subject = ? WHERE event_id = ?", updates)


rekey_drops_task = task(
    name="rekey-drops",
    retries=2,
    retry_condition_fn=retry_transient,
    retry_delay_seconds=[1, 5],
    cache_policy=NO_CACHE,
)(rekey_drops)
