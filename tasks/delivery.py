"""Delivery: a shared study's images sent to its grantee, encrypted to the grantee alone.

A share row with ``deliver: true`` asks for it (``delivery_requests``); the grantee's key
comes from the recipients registry (:mod:`dropvault.tasks.recipients`). For each grant in
force that asks for delivery and whose grantee has a key, :func:`deliver_due` builds one
**package** per study: a tar holding ``index.json`` (each file's name, size and SHA-256;
no PHI) and the original DICOM files, byte-identical, as ``images/00001.dcm``, ...,
encrypted with age to the grantee's X25519 key (pyrage, streaming: the tar is produced
while age reads it, so memory does not grow with the study). It lands in the outbox as
``{grantee's keyed id}/{delivery_id}.tar.age`` and is recorded in ``deliveries``, with an
expiry (``DROPVAULT_DELIVERY_TTL_HOURS``, never past the grant's own).

A package is withdrawn (every version deleted, then checked gone) when its grant stops
being in force (revoked by the owner or an incident, expired, the study deleted or
archived), when it expires, when the grantee's key changes (a new package follows for the
new key) and when the study gains images (a new package replaces it). The sharing,
incident and deletion flows withdraw at once; ``deliver-shares`` (every 5 minutes) also
catches whatever changed in between, so a withdrawal takes effect within one run.

A grantee decrypts with any age implementation (``age -d -i key.txt pkg.tar.age | tar x``).

Races: a package is recorded ``writing`` before its first byte and checked again against
the grants after its last; a deletion or revoke landing in between finds the row and
deletes the object, or the writer finds the grant gone and deletes its own object.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import posixpath
import re
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import pandas as pd
import pyrage
from pyrage import x25519

from dropvault.storage.catalog import Catalog, insert_rows
from dropvault.storage.home import Home
from dropvault.tasks.audit import audit
from dropvault.tasks.phi import keyed_hash, study_key

log = logging.getLogger(__name__)

SUFFIX = ".tar.age"
CHUNK = 1 << 20
ACTION = "deliver"
DEFAULT_TTL = timedelta(days=7)
# A package still "writing" this long after it began was left by a killed run: withdrawn as
# failed, and built again.
STALE_WRITING = timedelta(hours=6)
# A temporary file no writer has touched this long belongs to a killed one.
STALE_TMP = timedelta(minutes=15)
TMP_PREFIX = ".tmp-"  # storage.locations' temporary names
GRANTEE_FOLDER = re.compile(r"[0-9a-f]{24}")  # {outbox}/<grantee's keyed id>/

# Grants in force that ask for delivery, each study they cover, and the grantee's key.
IN_FORCE = """
SELECT s.study_uid, s.owner, s.rev AS study_rev, g.grantee, g.grant_request_id,
       g.expires_at AS grant_expires_at, k.version AS key_version, k.public_key
FROM grants g
JOIN studies s ON s.owner = g.owner AND (g.study_uid = s.study_uid OR g.study_uid = '*')
JOIN delivery_requests d ON d.request_id = g.grant_request_id
JOIN recipient_keys k ON k.user_id = g.grantee AND k.retired_at IS NULL
WHERE s.status = 'active' AND g.revoked_at IS NULL
  AND (g.expires_at IS NULL OR g.expires_at > ?)
"""
LIVE = "status IN ('writing', 'delivered')"


class PackageError(RuntimeError):
    """A package could not be built (an image failed its check, its key is gone)."""


@dataclass
class DeliveryResult:
    """What one run delivered and withdrew."""

    delivered: list[dict[str, Any]] = field(default_factory=list)  # delivery id, files, bytes
    withdrawn: dict[str, int] = field(default_factory=dict)  # by reason
    failed: int = 0
    waiting_for_key: int = 0  # grants asking for delivery whose grantee has no key
    unverified: int = 0  # withdrawn packages with something left in the outbox
    leftovers: int = 0  # what killed writers left, removed

    def summary(self) -> dict[str, Any]:
        return {
            "delivered": len(self.delivered),
            "files": sum(d["files"] for d in self.delivered),
            "bytes": sum(d["bytes"] for d in self.delivered),
            "withdrawn": sum(self.withdrawn.values()),
            "withdrawn_by_reason": dict(sorted(self.withdrawn.items())),
            "failed": self.failed,
            "waiting_for_key": self.waiting_for_key,
            "leftovers_removed": self.leftovers,
            "all_withdrawals_verified": self.unverified == 0,
        }

    def _repr_html_(self) -> str:
        rows = [{"metric": k, "value": str(v)} for k, v in self.summary().items()]
        return pd.DataFrame(rows).to_html(index=False)


# -- the package: a tar produced while age reads it -----------------------------------------


class _TarStream(io.RawIOBase):
    """A read-only stream of a tar built on demand from byte chunks (bounded memory)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = b""
        self.error: BaseException | None = None  # what the chunks raised, if anything

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            try:
                self._pending = next(self._chunks)
            except StopIteration:
                return 0
            except BaseException as exc:
                self.error = exc
                raise
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def _member(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o600, 0
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _padding(size: int) -> bytes:
    return b"\0" * (-size % tarfile.BLOCKSIZE)


def _images(home: Home, study_uid: str) -> pd.DataFrame:
    return home.catalog.query(
        "SELECT o.location_url, o.name, i.sha256, i.size_bytes FROM instances i"
        " JOIN objects o USING (object_id) WHERE i.study_uid = ?"
        " ORDER BY i.series_uid, i.sop_instance_uid",
        [study_uid],
    )


def package_chunks(home: Home, images: pd.DataFrame) -> Iterator[bytes]:
    """The package's tar, chunk by chunk: ``index.json``, then each image decrypted and
    checked against its catalog SHA-256 and size (a mismatch stops the package)."""
    names = [f"images/{i + 1:05d}.dcm" for i in range(len(images))]
    index = {
        "format": "dropvault-package/1",
        "files": [
            {"name": n, "bytes": int(size), "sha256": str(sha)}
            for n, size, sha in zip(names, images["size_bytes"], images["sha256"], strict=True)
        ],
    }
    raw = json.dumps(index, indent=1).encode()
    yield _member("index.json", len(raw)) + raw + _padding(len(raw))
    for name, row in zip(names, _rows(images), strict=True):
        size = int(row.size_bytes)
        yield _member(name, size)
        digest, seen = hashlib.sha256(), 0
        with home.store_for(str(row.location_url)).open(str(row.name)) as src:
            while chunk := src.read(CHUNK):
                seen += len(chunk)
                if seen > size:
                    raise PackageError("an image is longer than its catalog size")
                digest.update(chunk)
                yield chunk
        if seen != size or digest.hexdigest() != row.sha256:
            raise PackageError("an image does not match its catalog checksum")
        yield _padding(size)
    yield b"\0" * (2 * tarfile.BLOCKSIZE)


def write_package(home: Home, name: str, study_uid: str, public_key: str) -> tuple[int, int]:
    """Encrypt the study's package to one age recipient into ``{outbox}/{name}``; returns
    (files, plaintext bytes). Raises :class:`PackageError` naming the cause's type (an
    image that fails its check, a destroyed key, a store error, a key pyrage refuses);
    nothing is left in the outbox then."""
    images = _images(home, study_uid)
    stream = _TarStream(package_chunks(home, images))
    try:
        recipient = x25519.Recipient.from_str(public_key)
        with home.outbox.writer(name) as out:
            pyrage.encrypt_io(stream, out, [recipient])  # type: ignore[arg-type]
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - pyrage panics (PanicException) are BaseException
        with contextlib.suppress(OSError):
            home.outbox.delete(name)
        # pyrage reports an error raised in the tar stream as its own EncryptError; the
        # stream keeps what it raised.
        cause = stream.error or exc
        raise PackageError(type(cause).__name__) from cause
    return len(images), int(images["size_bytes"].sum())


# -- what is due, what must go ---------------------------------------------------------------


def _rows(frame: pd.DataFrame) -> list[Any]:
    """The frame's rows as named tuples (typed loosely: the columns are the query's)."""
    return list(frame.itertuples(index=False))


def _one_per_study(frame: pd.DataFrame) -> pd.DataFrame:
    # A study covered by two delivering grants (its own and '*') gets one package.
    return frame.sort_values(["grantee", "study_uid", "grant_request_id"]).drop_duplicates(
        ["grantee", "study_uid"]
    )


def withdrawal_reasons(catalog: Catalog, now: datetime) -> dict[str, str]:
    """Each live package that must go, with why: ``expired``, ``not_in_force`` (revoked,
    grant expired, study deleted or archived, delivery no longer asked), ``key_changed``,
    or ``replaced`` (the study changed and its new package is delivered)."""
    force, live = catalog.read_only().many(
        [(IN_FORCE, [now]), (f"SELECT * FROM deliveries WHERE {LIVE}", [])]  # noqa: S608
    )
    current = {
        (r.grantee, r.study_uid, r.grant_request_id): (int(r.key_version), int(r.study_rev))
        for r in _rows(_one_per_study(force))
    }
    delivered = {
        (r.grantee, r.study_uid, int(r.key_version), int(r.study_rev))
        for r in _rows(live)
        if r.status == "delivered"
    }
    reasons: dict[str, str] = {}
    for r in _rows(live):
        now_key = current.get((r.grantee, r.study_uid, r.grant_request_id))
        if r.expires_at <= now:
            reasons[r.delivery_id] = "expired"
        elif r.status == "writing" and r.created_at <= now - STALE_WRITING:
            reasons[r.delivery_id] = "failed"
        elif now_key is None:
            reasons[r.delivery_id] = "not_in_force"
        elif now_key[0] != int(r.key_version):
            reasons[r.delivery_id] = "key_changed"
        elif now_key[1] != int(r.study_rev) and (r.grantee, r.study_uid, *now_key) in delivered:
            reasons[r.delivery_id] = "replaced"
    return reasons


def _remove(home: Home, name: str) -> int:
    """Delete a package, every version; returns what is left of it (0 when gone). A
    package that cannot be removed (a folder made unwritable) is logged by its error's
    type and left for the next run: it must not stop the others' withdrawal."""
    try:
        home.outbox.delete(name)
        return home.outbox.remaining(name)
    except OSError as exc:
        log.warning("a package could not be removed (%s); retried next run", type(exc).__name__)
        return 1


def sweep_leftovers(home: Home, now: datetime) -> int:
    """Remove what no live package row names from the grantees' folders of the outbox: a
    package published after its row was withdrawn (a revoke or deletion landed mid-write,
    then the writer died before its own check), anything else put there, and temporary
    files no writer has touched for :data:`STALE_TMP` (decryptable in part). One listing
    per run. The listing comes first and the rows second: a writer records its row before
    its first byte, so a package being delivered is never taken. Returns how many went."""
    entries = [e for e in home.outbox.list() if GRANTEE_FOLDER.fullmatch(e.name.split("/")[0])]
    live = set(home.catalog.query(f"SELECT name FROM deliveries WHERE {LIVE}")["name"])  # noqa: S608
    cutoff = now.timestamp() - STALE_TMP.total_seconds()
    removed = 0
    for entry in entries:
        if posixpath.basename(entry.name).startswith(TMP_PREFIX):
            if entry.mtime < cutoff:
                with contextlib.suppress(OSError, ValueError):
                    removed += home.outbox.delete(entry.name, unchecked=True) > 0
        elif entry.name not in live:
            with contextlib.suppress(OSError, ValueError):
                home.outbox.delete(entry.name, unchecked=True)
                removed += not home.outbox.exists(entry.name)
    return removed


def withdraw(home: Home, reasons: dict[str, str], now: datetime) -> tuple[dict[str, int], int]:
    """Delete these packages (every version) and mark them withdrawn; returns the count by
    reason and how many still have something left in the outbox (kept live, retried)."""
    if not reasons:
        return {}, 0
    rows = home.catalog.query(
        "SELECT delivery_id, name FROM deliveries"
        " WHERE delivery_id IN (SELECT unnest(?::VARCHAR[]))",
        [sorted(reasons)],
    )
    gone = dict(reasons)
    left = 0
    for delivery_id, name in zip(rows["delivery_id"], rows["name"], strict=True):
        if _remove(home, str(name)):
            left += 1
            gone.pop(str(delivery_id))
    frame = pd.DataFrame({"delivery_id": list(gone), "reason": list(gone.values())})

    def mark(con: duckdb.DuckDBPyConnection) -> None:
        con.register("_gone", frame)
        try:
            con.execute(
                "UPDATE deliveries SET status = 'withdrawn', withdrawn_at = ?,"
                " withdraw_reason = g.reason FROM _gone g"
                " WHERE deliveries.delivery_id = g.delivery_id",
                [now],
            )
        finally:
            con.unregister("_gone")

    if gone:
        home.catalog.write(mark)
    counts: dict[str, int] = {}
    for reason in gone.values():
        counts[reason] = counts.get(reason, 0) + 1
    return counts, left


def withdraw_out_of_force(home: Home, now: datetime | None = None) -> tuple[dict[str, int], int]:
    """Withdraw every live package that must go now (see :func:`withdrawal_reasons`)."""
    now = now or datetime.now(UTC)
    return withdraw(home, withdrawal_reasons(home.catalog, now), now)


def withdraw_studies(home: Home, study_uids: list[str], now: datetime) -> set[str]:
    """A deletion's (or archive's) step: every package of these studies goes, whatever its
    state; returns the studies with a version still left in the outbox (none when done)."""
    if not study_uids:
        return set()
    rows = home.catalog.query(
        "SELECT study_uid, name FROM deliveries WHERE study_uid IN (SELECT unnest(?::VARCHAR[]))",
        [study_uids],
    )
    left: set[str] = set()
    for study_uid, name in zip(rows["study_uid"], rows["name"], strict=True):
        if _remove(home, str(name)):
            left.add(str(study_uid))
    home.catalog.write(
        lambda con: con.execute(
            f"UPDATE deliveries SET status = 'withdrawn', withdrawn_at = ?,"  # noqa: S608
            f" withdraw_reason = 'not_in_force' WHERE {LIVE}"
            " AND study_uid IN (SELECT unnest(?::VARCHAR[]))",
            [now, study_uids],
        )
    )
    return left


# -- delivering ---------------------------------------------------------------------------------


def due(catalog: Catalog, now: datetime) -> tuple[pd.DataFrame, int]:
    """The packages to build now, and how many delivering grants wait for a grantee's key.
    A package is due once per grant, key version and study revision (a failed one again)."""
    force, made, waiting = catalog.read_only().many(
        [
            (IN_FORCE, [now]),
            (
                "SELECT DISTINCT grantee, study_uid, grant_request_id, key_version, study_rev"
                " FROM deliveries WHERE coalesce(withdraw_reason, '') <> 'failed'",
                [],
            ),
            (
                "SELECT count(*) AS n FROM grants g"
                " JOIN delivery_requests d ON d.request_id = g.grant_request_id"
                " WHERE g.revoked_at IS NULL AND (g.expires_at IS NULL OR g.expires_at > ?)"
                " AND g.grantee NOT IN"
                " (SELECT user_id FROM recipient_keys WHERE retired_at IS NULL)",
                [now],
            ),
        ]
    )
    force = _one_per_study(force)
    keys = ["grantee", "study_uid", "grant_request_id", "key_version", "study_rev"]
    merged = force.merge(
        made.astype(force[keys].dtypes.to_dict()), on=keys, how="left", indicator=True
    )
    return merged[merged["_merge"] == "left_only"].drop(columns="_merge"), int(waiting["n"].iloc[0])


def _still_in_force(con: duckdb.DuckDBPyConnection, row: Any, now: datetime) -> bool:
    return bool(
        con.execute(
            IN_FORCE + " AND g.grantee = ? AND s.study_uid = ? AND g.grant_request_id = ?"
            " AND k.version = ? AND s.rev = ?",
            [now, row.grantee, row.study_uid, row.grant_request_id, row.key_version, row.study_rev],
        ).fetchone()
    )


def deliver_one(home: Home, row: Any, now: datetime, ttl: timedelta) -> dict[str, Any] | None:
    """Build, write and record one package; None when its grant went meanwhile. Raises
    :class:`PackageError` (after withdrawing what was written) when it cannot be built."""
    delivery_id = uuid.uuid4().hex
    folder = keyed_hash(home.pepper, "outbox", str(row.grantee), length=24)  # GRANTEE_FOLDER
    name = f"{folder}/{delivery_id}{SUFFIX}"
    expires = now + ttl
    if row.grant_expires_at is not None and not pd.isna(row.grant_expires_at):
        expires = min(expires, row.grant_expires_at.to_pydatetime())
    record = {
        "delivery_id": delivery_id,
        "owner": row.owner,
        "grantee": row.grantee,
        "study_uid": row.study_uid,
        "grant_request_id": row.grant_request_id,
        "key_version": int(row.key_version),
        "study_rev": int(row.study_rev),
        "name": name,
        "status": "writing",
        "created_at": now,
        "expires_at": expires,
    }

    def start(con: duckdb.DuckDBPyConnection) -> bool:
        if not _still_in_force(con, row, now):
            return False
        insert_rows(con, "deliveries", [record])
        return True

    if not home.catalog.write(start):
        return None
    try:
        files, size = write_package(home, name, str(row.study_uid), str(row.public_key))
    except PackageError:
        withdraw(home, {delivery_id: "failed"}, now)
        raise

    def finish(con: duckdb.DuckDBPyConnection) -> bool:
        state = con.execute(
            "SELECT status FROM deliveries WHERE delivery_id = ?", [delivery_id]
        ).fetchone()
        if not state or state[0] != "writing" or not _still_in_force(con, row, now):
            return False
        con.execute(
            "UPDATE deliveries SET status = 'delivered', files = ?, bytes = ?"
            " WHERE delivery_id = ?",
            [files, size, delivery_id],
        )
        detail = {"delivery_id": delivery_id, "files": files, "bytes": size}
        subject = study_key(home.pepper, str(row.study_uid))
        audit(con, actor=str(row.grantee), action=ACTION, subject=subject, detail=detail, at=now)
        return True

    if not home.catalog.write(finish):
        withdraw(home, {delivery_id: "not_in_force"}, now)
        return None
    return {"delivery_id": delivery_id, "name": name, "files": files, "bytes": size}


def deliver_due(
    home: Home, now: datetime | None = None, ttl: timedelta = DEFAULT_TTL
) -> DeliveryResult:
    """One delivery run: withdraw what must go, build every due package, then withdraw the
    packages the new ones replace. A package that fails is counted and retried next run."""
    now = now or datetime.now(UTC)
    result = DeliveryResult()
    result.leftovers = sweep_leftovers(home, now)
    counts, result.unverified = withdraw_out_of_force(home, now)
    todo, result.waiting_for_key = due(home.catalog, now)
    for row in _rows(todo):
        try:
            made = deliver_one(home, row, now, ttl)
        except PackageError as exc:
            log.warning("a package could not be built (%s); retried next run", exc)
            result.failed += 1
            continue
        if made is not None:
            result.delivered.append(made)
    more, left = withdraw_out_of_force(home, now)
    result.unverified += left
    for reason, n in (*counts.items(), *more.items()):
        result.withdrawn[reason] = result.withdrawn.get(reason, 0) + n
    return result


def deliveries_for(catalog: Catalog, user: str) -> pd.DataFrame:
    """A grantee's packages in the outbox now (what their portal offers to download)."""
    return catalog.query(
        "SELECT delivery_id, name, owner, files, bytes, created_at, expires_at FROM deliveries"
        " WHERE grantee = ? AND status = 'delivered' ORDER BY created_at",
        [user],
    )
