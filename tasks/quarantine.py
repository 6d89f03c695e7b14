"""Quarantine: files that cannot be cataloged keep their bytes, encrypted, with a reason.

Each quarantined file is stored as a DVLT object under
``{quarantine}/{facility_id}/{drop_id}/{quarantine_id}.dvlt`` (``drop_id`` the drop's
keyed id: folder names can be PHI) with its own
record key, beside ``{quarantine_id}.json`` that holds the reason code and
PHI-free facts (sizes, hashes, times). The original file name can itself
carry PHI, so it is kept only encrypted in the catalog.

``quarantine_id`` is a keyed hash of facility, drop, name and content, so a
rerun after a crash finds the same id and never quarantines a file twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import duckdb
from prefect import task
from prefect.cache_policies import NO_CACHE

from dropvault.storage.catalog import Catalog
from dropvault.storage.errors import retry_transient
from dropvault.storage.home import Home
from dropvault.storage.keystore import KeyDestroyedError, UnknownKeyError
from dropvault.storage.locations import UnsafeNameError, safe_relpath
from dropvault.tasks.audit import audit, audit_viewing
from dropvault.tasks.drop_names import drop_names, printable
from dropvault.tasks.objects import object_row
from dropvault.tasks.phi import keyed_hash, open_fields, seal_fields
from dropvault.tasks.reasons import QuarantineReason

if TYPE_CHECKING:
    import pandas as pd

REASONS = tuple(QuarantineReason)  # every reason code (tasks/reasons.py)


@dataclass(frozen=True)
class Quarantined:
    quarantine_id: str
    reason: str
    row: dict[str, Any]
    object_row: dict[str, Any] | None  # None: nothing could be read, so nothing is stored


def quarantine_id(pepper: bytes, facility_id: str, drop_id: str, name: str, sha256: str) -> str:
    return "q_" + keyed_hash(pepper, "quarantine", facility_id, drop_id, name, sha256, length=30)


def quarantine_object_name(facility_id: str, drop_id: str, qid: str) -> str:
    """Where a quarantined file's object goes (its reason file is beside it, ``.json``)."""
    return f"{_folder(facility_id, drop_id)}/{qid}.dvlt"


def _folder(facility_id: str, drop_id: str) -> str:
    try:
        return safe_relpath(facility_id, drop_id)
    except UnsafeNameError:
        return "_unsafe"


def quarantine_row(
    *,
    qid: str,
    facility_id: str,
    drop_id: str,
    reason: QuarantineReason,
    detail: str,
    object_id: str,
    study_uid: str | None,
    size: int,
    sha256: str,
    name_enc: bytes | None,
    at: datetime,
) -> dict[str, Any]:
    """A ``quarantine`` row (the one place such a row is built)."""
    return {
        "quarantine_id": qid,
        "facility_id": facility_id,
        "drop_id": drop_id,
        "reason": QuarantineReason(reason),
        "detail": detail,
        "object_id": object_id,
        "study_uid": study_uid,
        "size_bytes": size,
        "sha256": sha256,
        "source_name_enc": name_enc,
        "quarantined_at": at,
    }


def quarantine_file(
    home: Home,
    *,
    facility_id: str,
    drop_id: str,
    source_name: str,
    src: IO[bytes],
    size: int,
    sha256: str,
    reason: QuarantineReason,
    detail: str,
    study_uid: str | None,
    now: datetime,
) -> Quarantined:
    """Encrypt one file into quarantine and write its reason file; returns the catalog rows.

    The caller commits the rows, then removes the source.
    """
    reason = QuarantineReason(reason)  # a stray string fails here, before anything is written
    qid = quarantine_id(home.pepper, facility_id, drop_id, source_name, sha256)
    folder = _folder(facility_id, drop_id)
    key_id, record_key = home.keystore.create()
    store = home.quarantine_store()
    object_name = quarantine_object_name(facility_id, drop_id, qid)
    sealed = store.put(object_name, src, key_id)
    store.verify(object_name, sealed)
    # What was stored, as read now: a source changed since it was hashed is recorded as it
    # is kept (the id stays the listing's, so a rerun with the new bytes stores those too).
    size, sha256 = sealed.plaintext_bytes, sealed.sha256
    facts = {
        "quarantine_id": qid,
        "reason": reason,
        "detail": detail,
        "facility_id": facility_id if folder != "_unsafe" else None,
        "drop_id": drop_id if folder != "_unsafe" else None,
        "size_bytes": size,
        "sha256": sha256,
        "format": "DVLT1",
        "quarantined_at": now.isoformat(),
    }
    home.quarantine.put_bytes(f"{folder}/{qid}.json", json.dumps(facts, indent=2).encode())
    row = quarantine_row(
        qid=qid,
        facility_id=facility_id,
        drop_id=drop_id,
        reason=reason,
        detail=detail,
        object_id=qid,
        study_uid=study_uid,
        size=size,
        sha256=sha256,
        name_enc=seal_fields(record_key, qid, {"name": source_name}),
        at=now,
    )
    objects_row = object_row(
        object_id=qid,
        kind="quarantine",
        location=home.quarantine,
        region=home.region,
        name=object_name,
        record_key_id=key_id,
        sealed=sealed,
        created_at=now,
    )
    return Quarantined(qid, reason, row, objects_row)


def discard_stored(home: Home, facility_id: str, drop_id: str, qid: str) -> None:
    """Delete what :func:`quarantine_file` stored (its object and reason file) before any
    row names it: a copy of bytes other than those the file was named by."""
    for name in (
        quarantine_object_name(facility_id, drop_id, qid),
        f"{_folder(facility_id, drop_id)}/{qid}.json",
    ):
        home.quarantine.delete(name)


def unreadable_id(
    pepper: bytes, facility_id: str, drop_id: str, name: str, size: int, mtime: float
) -> str:
    """The quarantine id of a file that cannot be read: from what the listing showed, so
    the same file is reported once, and again only if it changes."""
    return quarantine_id(pepper, facility_id, drop_id, name, f"unreadable:{size}:{mtime!r}")


def quarantine_unreadable(
    home: Home,
    *,
    facility_id: str,
    drop_id: str,
    qid: str,
    size: int,
    detail: str,
    now: datetime,
    reason: QuarantineReason = QuarantineReason.UNREADABLE,
    sha256: str = "",
) -> Quarantined:
    """The catalog row for a file of a drop that is not read (a symlink, a special file,
    no permission, a path past the length limit; or ``too_large``). Nothing is stored and
    the file stays where the facility put it, so nothing is lost; the row tells the facility
    and the operator. Its name is not kept: the file is in its drop for whoever can read it."""
    row = quarantine_row(
        qid=qid,
        facility_id=facility_id,
        drop_id=drop_id,
        reason=reason,
        detail=detail,
        object_id="",  # nothing stored
        study_uid=None,
        size=size,
        sha256=sha256,
        name_enc=None,
        at=now,
    )
    return Quarantined(qid, QuarantineReason(reason), row, None)


def quarantine_shredded(
    home: Home,
    *,
    facility_id: str,
    drop_id: str,
    qid: str,
    size: int,
    sha256: str,
    now: datetime,
) -> Quarantined:
    """The record of a file of a study its owner deleted, arrived late: no bytes kept, no
    key made, no name, no UID; only that a file of this size was refused, and a keyed hash
    of its content (which proves nothing to anyone without the pepper)."""
    return quarantine_unreadable(
        home,
        facility_id=facility_id,
        drop_id=drop_id,
        qid=qid,
        size=size,
        detail="study was deleted by its owner; the file was not kept",
        now=now,
        reason=QuarantineReason.DELETED_BY_OWNER,
        sha256="kh_" + keyed_hash(home.pepper, "late file", sha256),
    )


# The list's filters (each off when its parameter is NULL), for one fixed statement.
def _filters(facility: str | None, drop: str | None, reason: str | None) -> list[str | None]:
    return [facility, facility, drop, drop, reason, reason]


def quarantine_list(
    catalog: Catalog,
    *,
    facility: str | None = None,
    drop: str | None = None,
    reason: str | None = None,
) -> pd.DataFrame:
    """The quarantine, PHI-free (drops by keyed id, no file names), newest first; only one
    facility's, one drop's (keyed id) or one reason's files when asked."""
    return catalog.query(
        "SELECT quarantine_id, facility_id, drop_id, reason, detail, size_bytes, sha256,"
        " quarantined_at FROM quarantine q"
        " WHERE (CAST(? AS VARCHAR) IS NULL OR q.facility_id = ?)"
        " AND (CAST(? AS VARCHAR) IS NULL OR q.drop_id = ?)"
        " AND (CAST(? AS VARCHAR) IS NULL OR q.reason = ?)"
        " ORDER BY quarantined_at DESC, quarantine_id",
        _filters(facility, drop, reason),
    )


def quarantine_list_named(
    home: Home,
    *,
    actor: str = "operator",
    facility: str | None = None,
    drop: str | None = None,
    reason: str | None = None,
) -> pd.DataFrame:
    """The quarantine with each file's drop folder name and file name opened (an operator
    holding the keys, to tell a facility which file to fix); the viewing is audited.
    A name shows as None where none was kept (an unreadable file) or its key is gone."""
    frame = home.catalog.query(
        "SELECT q.quarantine_id, q.facility_id, q.drop_id, q.reason, q.detail, q.size_bytes,"
        " q.sha256, q.quarantined_at, q.source_name_enc, o.record_key_id"
        " FROM quarantine q LEFT JOIN objects o USING (object_id)"
        " WHERE (CAST(? AS VARCHAR) IS NULL OR q.facility_id = ?)"
        " AND (CAST(? AS VARCHAR) IS NULL OR q.drop_id = ?)"
        " AND (CAST(? AS VARCHAR) IS NULL OR q.reason = ?)"
        " ORDER BY q.quarantined_at DESC, q.quarantine_id",
        _filters(facility, drop, reason),
    )
    drops = list(zip(frame["facility_id"], frame["drop_id"], strict=True))
    folders = drop_names(home, drops)
    frame.insert(3, "drop_name", [folders[d] for d in drops])
    frame.insert(4, "file_name", [_file_name(home, r) for r in frame.itertuples()])
    audit_viewing(
        home.catalog, actor=actor, action="quarantine_names_viewed", subject=str(len(frame))
    )
    return frame.drop(columns=["source_name_enc", "record_key_id"])


RELEASED = "released-"  # drop folders a release writes: ``{facility}/released-<id>/<file>``


def quarantine_release(
    home: Home, qid: str, now: datetime, *, actor: str = "operator"
) -> dict[str, Any]:
    """Put a quarantined file back for ingest, after its cause was fixed (a drop that went
    incomplete, a manifest with a wrong checksum): its original bytes go to a drop of
    their own, ``{facility}/released-<id>/<file name>``, which the next pass ingests like
    any drop without a manifest; then the row says it was released (audited in the same
    transaction) and the quarantined copy is shredded. A run stopped before the commit is
    run again whole (the write is atomic); one stopped after it leaves only an object that
    reconcile removes."""
    rows = home.catalog.query(
        "SELECT q.facility_id, q.source_name_enc, o.location_url, o.name, o.record_key_id"
        " FROM quarantine q JOIN objects o USING (object_id) WHERE q.quarantine_id = ?",
        [qid],
    )
    if rows.empty:
        raise LookupError(f"no quarantined file {qid} with its bytes kept (nothing to release)")
    row = rows.iloc[0]
    key = home.keystore.unwrap(str(row["record_key_id"]))
    listed = str(open_fields(key, qid, bytes(row["source_name_enc"]))["name"])
    base = listed.rsplit("/", 1)[-1]
    try:
        target = safe_relpath(str(row["facility_id"]), RELEASED + qid, base)
    except UnsafeNameError:
        raise ValueError(
            f"{qid}: its file name is unsafe; export it and drop it under a safe name"
        ) from None
    location = home.location_for(str(row["location_url"]))
    store = home.quarantine_store()
    with store.open(str(row["name"])) as src, home.drops.writer(target) as dst:
        while chunk := src.read(1024 * 1024):
            dst.write(chunk)

    # The catalog first (the row says released, the audit row lands), then the shredding:
    # a run stopped after the commit leaves an object no row names, which reconcile
    # removes, and a key nothing uses; never a row whose key is gone.
    def work(con: duckdb.DuckDBPyConnection) -> None:
        con.execute("DELETE FROM objects WHERE object_id IN (SELECT object_id FROM quarantine"
                    " WHERE quarantine_id = ?)", [qid])  # fmt: skip
        con.execute("DELETE FROM quarantine_uids WHERE quarantine_id = ?", [qid])
        con.execute(
            "UPDATE quarantine SET object_id = '', source_name_enc = NULL, study_uid = NULL,"
            " detail = ? WHERE quarantine_id = ?",
            [f"released for ingest at {now:%Y-%m-%d %H:%M} UTC", qid],
        )
        audit(con, actor=actor, action="quarantine_released", subject=qid, detail=None, at=now)

    home.catalog.write(work)
    home.keystore.destroy([str(row["record_key_id"])])
    location.delete(str(row["name"]))
    location.delete(str(row["name"])[: -len(".dvlt")] + ".json")
    return {"quarantine_id": qid, "released_to": f"{row['facility_id']}/{RELEASED}{qid}"}


def _file_name(home: Home, row: Any) -> str | None:
    if not isinstance(row.source_name_enc, bytes | bytearray) or not isinstance(
        row.record_key_id, str
    ):
        return None  # none kept (an unreadable file)
    try:
        key = home.keystore.unwrap(str(row.record_key_id))
    except (KeyDestroyedError, UnknownKeyError):
        return None
    return printable(open_fields(key, str(row.quarantine_id), bytes(row.source_name_enc))["name"])


def quarantine_export(
    home: Home, qid: str, out: Path, *, actor: str = "operator"
) -> dict[str, Any]:
    """Decrypt a quarantined file to ``out`` (for an operator's review); audited."""
    rows = home.catalog.query(
        "SELECT q.facility_id, q.drop_id, q.source_name_enc, o.name, o.record_key_id"
        " FROM quarantine q JOIN objects o USING (object_id) WHERE q.quarantine_id = ?",
        [qid],
    )
    if rows.empty:
        raise LookupError(f"no quarantined file {qid}")
    row = rows.iloc[0]
    store = home.quarantine_store()
    out.parent.mkdir(parents=True, exist_ok=True)
    with store.open(str(row["name"])) as src, out.open("wb") as dst:
        while chunk := src.read(1024 * 1024):
            dst.write(chunk)
    name = open_fields(
        home.keystore.unwrap(str(row["record_key_id"])), qid, bytes(row["source_name_enc"])
    )["name"]
    audit_viewing(home.catalog, actor=actor, action="quarantine_export", subject=qid)
    return {"quarantine_id": qid, "source_name": name, "out": str(out)}


def expire_quarantine(home: Home, now: datetime, days: int, *, actor: str = "deletion") -> int:
    """Shred every quarantined file kept longer than ``days`` (0: keep for ever).

    A damaged file that names no study by any UID cannot be deleted with its study, yet
    may still hold a patient's name; so no quarantined file outlives its retention. The
    record key is destroyed first (any copy or version is unreadable from then), then
    every version of the object and its reason file go, then the row keeps only PHI-free
    facts (reason, size, time) and says it was shredded. A stopped run resumes from any
    step. Returns how many files were shredded."""
    if days <= 0:
        return 0
    due = home.catalog.query(
        "SELECT q.quarantine_id, o.location_url, o.name, o.record_key_id"
        " FROM quarantine q JOIN objects o USING (object_id) WHERE q.quarantined_at < ?",
        [now - timedelta(days=days)],
    )
    if due.empty:
        return 0
    home.keystore.destroy(sorted(set(due["record_key_id"])))
    for url, name in zip(due["location_url"], due["name"], strict=True):
        location = home.location_for(str(url))
        location.delete(str(name))
        location.delete(str(name)[: -len(".dvlt")] + ".json")
    ids = list(due["quarantine_id"])

    def work(con: duckdb.DuckDBPyConnection) -> None:
        ids_in = "IN (SELECT unnest(?::VARCHAR[]))"
        for table, column in (("objects", "object_id"), ("quarantine_uids", "quarantine_id")):
            con.execute(f"DELETE FROM {table} WHERE {column} {ids_in}", [ids])  # noqa: S608
        con.execute(
            "UPDATE quarantine SET object_id = '', source_name_enc = NULL, study_uid = NULL,"
            " detail = ? WHERE quarantine_id IN (SELECT unnest(?::VARCHAR[]))",
            [f"kept {days} days, then shredded", ids],
        )
        audit(
            con,
            actor=actor,
            action="quarantine_expired",
            subject=f"{len(ids)} files",
            detail={"retention_days": days},
            at=now,
        )

    home.catalog.write(work)
    return len(ids)


expire_quarantine_task = task(
    name="expire-quarantine",
    retries=2,
    retry_condition_fn=retry_transient,
    retry_delay_seconds=[1, 5],
    cache_policy=NO_CACHE,
)(expire_quarantine)
