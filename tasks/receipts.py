"""Receipts for facilities: what each drop did, written to the facility's own space.

After each ingest pass, every drop the pass handled or saw waiting gets
``{drops}/{facility}/_receipts/<drop_id>.json`` (replaced on each pass; never ingested, see
:data:`dropvault.tasks.layout.RECEIPTS`). It is named by the drop's keyed id, not its folder:
a folder name can hold PHI, and a deletion sweep must find and remove the receipts of a
deleted study's drops without it (:func:`receipt_name`)::

    {"drop": "<folder>", "state": "done|partial|incomplete|waiting", "written_at": ...,
     "files_seen": 3, "ingested": 2, "duplicates": 0, "quarantined": 1,
     "quarantined_files": {"not_dicom": ["notes.txt"]},
     "missing": ["series1/img003.dcm"], "why": "1 listed file(s) missing or short",
     "incomplete_at": "2026-12-03T10:00:00+00:00",
     "unpacked": ["export-1.zip"], "directory_references": 0}

An archive's members are named by their path under ``<archive>.contents/``; a CD's extras
kept are under ``cd_extra``, and those discarded (``DROPVAULT_CD_EXTRAS=discard``) under
``discarded``.

Names are the facility's own (relative to the drop folder): they can be PHI, so they go
only here, in the space the facility wrote them to, never to the catalog or a log. A file
of a study its owner deleted is reported as ``not_kept``, without saying why (the
owner's choice is not the facility's to know), and without its name: a receipt of a drop
holding one names neither the drop folder nor that file (they can name the patient).
The counts are this pass's; a drop that takes several passes gets a receipt per pass.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from dropvault.storage.errors import retry_transient
from dropvault.storage.locations import Location, UnsafeNameError, is_file_problem, read_problem
from dropvault.tasks.drops import Drop
from dropvault.tasks.ingest import DropCounts, IngestStats
from dropvault.tasks.layout import RECEIPTS
from dropvault.tasks.reasons import QuarantineReason

log = logging.getLogger(__name__)
NOT_KEPT = "not_kept"


@dataclass
class Receipt:
    drop: str  # the folder's own name (the facility's)
    state: str
    written_at: str
    files_seen: int = 0
    ingested: int = 0
    duplicates: int = 0
    quarantined: int = 0
    quarantined_files: dict[str, list[str]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    why: str = ""
    incomplete_at: str | None = None
    unpacked: list[str] = field(default_factory=list)  # archives opened this pass
    directory_references: int = 0  # files its DICOMDIRs reference (a CD)


def receipt_name(facility_id: str, drop_id: str) -> str:
    """Where a drop's receipt is, relative to the drops location."""
    return f"{facility_id}/{RECEIPTS}/{drop_id}.json"


def _iso(seconds: float | None) -> str | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC).isoformat()


def receipt_for(
    drop: Drop,
    counts: DropCounts | None,
    rejected: list[tuple[str, str]],
    state: str,
    now: datetime,
) -> Receipt:
    prefix = drop.folder + "/"
    files: dict[str, list[str]] = {}
    for name, reason in rejected:
        if reason == QuarantineReason.DELETED_BY_OWNER:
            files.setdefault(NOT_KEPT, [])  # counted below, never named
            continue
        files.setdefault(reason, []).append(name.removeprefix(prefix))
    not_kept = sum(1 for _, r in rejected if r == QuarantineReason.DELETED_BY_OWNER)
    if not_kept:
        files[NOT_KEPT] = [f"({not_kept} file(s))"]
    c = counts or DropCounts()
    return Receipt(
        drop="" if not_kept else drop.name,
        state=state,
        written_at=now.isoformat(),
        files_seen=c.files_seen,
        ingested=c.ingested,
        duplicates=c.duplicates,
        quarantined=c.quarantined,
        quarantined_files={r: sorted(n) for r, n in sorted(files.items())},
        missing=list(drop.missing),
        why=drop.why,
        incomplete_at=_iso(drop.incomplete_at) if state in ("waiting", "incomplete") else None,
        unpacked=sorted(n.removeprefix(prefix) for n in drop.unpacked),
        directory_references=drop.references,
    )


def write_receipts(
    drops_location: Location,
    drops: Sequence[Drop],
    stats: IngestStats,
    finished: dict[str, bool],
    now: datetime | None = None,
) -> int:
    """Write one receipt per drop (handled this pass, or waiting); returns how many. A drop
    with no folder of its own (files loose in the facility folder) gets none."""
    now = now or datetime.now(UTC)
    written = 0
    for drop in drops:
        if not drop.name:
            continue
        if drop.state == "waiting":
            state = "waiting"
        elif drop.state == "incomplete":
            state = "incomplete"
        else:
            state = "done" if finished.get(drop.key) else "partial"
        receipt = receipt_for(
            drop, stats.drops.get(drop.key), stats.rejected.get(drop.key, []), state, now
        )
        body = json.dumps(receipt.__dict__, indent=1).encode()  # ASCII: any name survives
        facility = drop.folder.partition("/")[0]
        try:
            drops_location.put_bytes(receipt_name(facility, drop.drop_id), body)
        except (UnsafeNameError, UnicodeError):
            log.warning(
                "drop %s/%s: no receipt (its name is unsafe)", drop.facility_id, drop.drop_id
            )
            continue
        except OSError as exc:
            if not is_file_problem(exc):
                raise  # the store's trouble: the task retries
            # A facility folder the service account cannot write: that drop gets no receipt.
            log.warning(
                "drop %s/%s: no receipt (%s)", drop.facility_id, drop.drop_id, read_problem(exc)
            )
            continue
        written += 1
    return written


def read_receipt(drops_location: Location, facility: str, drop_id: str) -> dict[str, Any]:
    """A receipt as the facility reads it (by the drop's keyed id)."""
    data: dict[str, Any] = json.loads(drops_location.read_bytes(receipt_name(facility, drop_id)))
    return data


def delete_receipts(drops_location: Location, drops: list[tuple[str, str]]) -> int:
    """Remove the receipts of these ``(facility_id, drop_id)`` drops (a deleted study's:
    they name its files); returns how many were there."""
    removed = 0
    for facility_id, drop_id in drops:
        name = receipt_name(facility_id, drop_id)
        if drops_location.exists(name):
            drops_location.delete(name)
            removed += 1
    return removed


write_receipts_task = task(
    name="write-receipts",
    retries=2,
    retry_condition_fn=retry_transient,
    retry_delay_seconds=[1, 5],
    cache_policy=NO_CACHE,
)(write_receipts)
