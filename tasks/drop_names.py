"""Drop names: keyed ids in the catalog, the real names sealed, and an operator's view.

Facilities name drop folders after patients (``DOE_JANE_MRN55501234``), so a drop's
folder name is PHI, like a file name. Everything that names a drop (catalog rows,
quarantine paths and their JSON, audit rows, logs, artifacts, errors) uses its keyed id
``d_<24 hex>``: an HMAC under the pepper of the facility and the folder name, so the same
folder always gets the same id and nobody without the pepper can go back. The real name
is kept only in ``drops.name_enc``, sealed under the drop's own record key, and shown
only to an operator who asks (``dropvault drops --names``), which is audited.

Catalogs made before drop ids were keyed hold the plain names; :func:`rekey_drops`
(run by ingest before its first scan) moves them to keyed ids and seals the names.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import duckdb
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from dropvault.storage.catalog import insert_rows
from dropvault.storage.errors import retry_transient
from dropvault.storage.home import Home
from dropvault.storage.keystore import KeyDestroyedError, Keystore, UnknownKeyError
from dropvault.tasks.audit import audit
from dropvault.tasks.phi import keyed_hash, open_fields, seal_fields

DROP_ID = re.compile(r"d_[0-9a-f]{24}")


def drop_id_for(pepper: bytes, facility_id: str, name: str) -> str:
    """The keyed id of the drop folder ``name`` of ``facility_id`` (raw, as listed)."""
    return "d_" + keyed_hash(pepper, "drop", facility_id, name, length=24)


def seal_names(keystore: Keystore, drops: list[tuple[str, str]]) -> list[tuple[str, bytes]]:
    """``(record_key_id, name_enc)`` for each new drop ``(drop_id, name)``: a record key of
    its own (one keystore transaction for all), so a name can be erased by destroying its
    key, with the drop id bound as associated data."""
    keys = keystore.create_many(len(drops))
    return [
        (key_id, seal_fields(record_key, drop_id, {"name": name}))
        for (key_id, record_key), (drop_id, name) in zip(keys, drops, strict=True)
    ]


def open_name(keystore: Keystore, drop_id: str, key_id: Any, sealed: Any) -> str | None:
    """The real name of a drop, or None when none was kept or its key is gone."""
    if not isinstance(key_id, str) or not isinstance(sealed, bytes | bytearray):
        return None  # a NULL (pandas may hand it over as NaN)
    try:
        record_key = keystore.unwrap(key_id)
    except (KeyDestroyedError, UnknownKeyError):
        return None  # destroyed: the name is erased
    return printable(open_fields(record_key, drop_id, bytes(sealed))["name"])


def printable(name: str) -> str:
    """A listed name for display: one that is not UTF-8 (kept with surrogates) shows its
    bytes escaped."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def drops_list(home: Home, *, names: bool = False, actor: str = "operator") -> pd.DataFrame:
    """Every drop the catalog knows, newest first, by keyed id. With ``names``, the real
    folder names are opened too, and the viewing is an audit row (who, how many)."""
    frame = home.catalog.query(
        "SELECT facility_id, drop_id, status, has_manifest, files_seen, ingested, duplicates,"
        " quarantined, bytes, first_seen_at, completed_at, record_key_id, name_enc"
        " FROM drops ORDER BY first_seen_at DESC, facility_id, drop_id"
    )
    if names:
        frame.insert(
            2,
            "name",
            [
                open_name(home.keystore, str(r.drop_id), r.record_key_id, r.name_enc)
                for r in frame.itertuples()
            ],
        )
        now = datetime.now(UTC)
        home.catalog.write(
            lambda con: audit(
                con,
                actor=actor,
                action="drop_names_viewed",
                subject=str(len(frame)),
                detail=None,
                at=now,
            )
        )
    return frame.drop(columns=["record_key_id", "name_enc"])


def drop_names(home: Home, keys: list[tuple[str, str]]) -> dict[tuple[str, str], str | None]:
    """Real names of the drops ``(facility_id, drop_id)`` (None where none is kept)."""
    if not keys:
        return {}
    frame = home.catalog.query(
        "SELECT facility_id, drop_id, record_key_id, name_enc FROM drops"
        " WHERE facility_id || '/' || drop_id IN (SELECT unnest(?::VARCHAR[]))",
        [sorted({f"{f}/{d}" for f, d in keys})],
    )
    found = {
        (str(r.facility_id), str(r.drop_id)): open_name(
            home.keystore, str(r.drop_id), r.record_key_id, r.name_enc
        )
        for r in frame.itertuples()
    }
    return {k: found.get(k) for k in keys}


# -- catalogs made before keyed drop ids --------------------------------------------------


@dataclass(frozen=True)
class _Legacy:
    facility_id: str
    name: str  # the plain drop_id such a catalog holds
    drop_id: str  # its keyed id


LEGACY = (
    "SELECT DISTINCT facility_id, drop_id FROM ("
    " SELECT facility_id, drop_id FROM drops UNION ALL"
    " SELECT facility_id, drop_id FROM instances UNION ALL"
    " SELECT facility_id, drop_id FROM quarantine)"
    " WHERE NOT regexp_full_match(drop_id, 'd_[0-9a-f]{24}')"
)


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
                [[new, qid] for qid, (_, new) in moves.items()],
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
    for old, _new in moves.values():
        home.quarantine.delete(old)
        home.quarantine.delete(old.removesuffix(".dvlt") + ".json")
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


def _move_quarantine(home: Home, legacy: list[_Legacy]) -> dict[str, tuple[str, str]]:
    """Copy each quarantined object of a legacy drop (and its reason file, with the keyed id
    in it) to the keyed folder; returns ``{object_id: (old name, new name)}``."""
    ids = {(i.facility_id, i.name): i.drop_id for i in legacy}
    rows = home.catalog.query(
        "SELECT q.facility_id, q.drop_id, o.object_id, o.name FROM quarantine q"
        " JOIN objects o USING (object_id) WHERE o.kind = 'quarantine'"
    )
    moves: dict[str, tuple[str, str]] = {}
    for facility_id, name, object_id, old in rows.itertuples(index=False):
        new_id = ids.get((str(facility_id), str(name)))
        if new_id is None:
            continue
        new = f"{facility_id}/{new_id}/{object_id}.dvlt"
        if old == new:
            continue
        with home.quarantine.open(str(old)) as src:
            home.quarantine.put_stream(new, src)
        facts_name = str(old).removesuffix(".dvlt") + ".json"
        if home.quarantine.exists(facts_name):
            facts = json.loads(home.quarantine.read_bytes(facts_name))
            facts["drop_id"] = new_id
            home.quarantine.put_bytes(
                new.removesuffix(".dvlt") + ".json", json.dumps(facts, indent=2).encode()
            )
        moves[str(object_id)] = (str(old), new)
    return moves


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
