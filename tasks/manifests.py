"""Request manifests: JSON Lines or CSV files under ``{manifests}/<kind>/``.

One request a row. A line that does not parse is kept as a row with an error
(reported with its line number), so one bad line never stops the rest. Once
processed, a manifest moves to ``<kind>/processed/`` with a
``<name>.results.jsonl`` beside it giving each row's outcome.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from dropvault.storage.errors import TerminalError
from dropvault.storage.locations import Location
from dropvault.tasks.reasons import RejectReason

SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv")
PROCESSED = "processed"


@dataclass(frozen=True)
class ManifestRow:
    manifest: str  # name relative to the manifests location
    line: int  # 1-based; for CSV the header is line 1
    fields: dict[str, str] | None  # None when the line does not parse
    error: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.manifest}#{self.line}"


class Rejected(TerminalError, ValueError):
    """A manifest row refused with a reason (share, revoke, disclose or deletion row); its
    outcome is ``rejected:<reason>``, and the other rows of the manifest still apply."""

    def __init__(self, reason: RejectReason | str) -> None:
        self.reason = (
            RejectReason(reason) if reason in set(RejectReason) else RejectReason.MALFORMED
        )
        super().__init__(str(self.reason))

    @property
    def outcome(self) -> str:
        return f"rejected:{self.reason}"


@dataclass
class RowOutcomes:
    """Each row's outcome (``applied``, ``duplicate``, ``rejected:<reason>``), by manifest."""

    outcomes: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    applied: int = 0
    duplicates: int = 0
    rejected: dict[str, int] = field(default_factory=dict)

    def note(self, row: ManifestRow, request_id: str | None, outcome: str) -> None:
        self.outcomes.setdefault(row.manifest, []).append(
            {"line": row.line, "request_id": request_id, "outcome": outcome}
        )
        if outcome == "applied":
            self.applied += 1
        elif outcome == "duplicate":
            self.duplicates += 1
        else:
            reason = outcome.removeprefix("rejected:")
            self.rejected[reason] = self.rejected.get(reason, 0) + 1


def pending_manifests(location: Location, kind: str) -> list[str]:
    """Manifests waiting under ``kind/`` (not in ``processed/``), oldest name first."""
    names = []
    for entry in location.list(kind):
        rel = entry.name[len(kind) + 1 :]
        if "/" in rel or rel.startswith(".") or not rel.endswith(SUFFIXES):
            continue
        names.append(entry.name)
    return sorted(names)


def _clean(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def parse_manifest(name: str, raw: bytes) -> list[ManifestRow]:
    """Rows of one manifest; undecodable or malformed lines become rows with ``error``."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return [ManifestRow(name, 0, None, "malformed")]
    if name.endswith(".csv"):
        return _csv_rows(name, text)
    return _jsonl_rows(name, text)


def _csv_rows(name: str, text: str) -> list[ManifestRow]:
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        return []
    except csv.Error:
        return [ManifestRow(name, 1, None, "malformed")]
    rows: list[ManifestRow] = []
    line = 1
    while True:
        line += 1
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error:
            rows.append(ManifestRow(name, line, None, "malformed"))
            continue
        if not values or all(not v.strip() for v in values):
            continue
        if len(values) != len(header):
            rows.append(ManifestRow(name, line, None, "malformed"))
            continue
        fields = {k: v for k, v in zip(header, values, strict=True)}
        rows.append(ManifestRow(name, line, {k: _clean(v) or "" for k, v in fields.items()}))
    return rows


def _jsonl_rows(name: str, text: str) -> list[ManifestRow]:
    rows: list[ManifestRow] = []
    for line, text_line in enumerate(text.splitlines(), start=1):
        if not text_line.strip():
            continue
        try:
            doc = json.loads(text_line)
        except json.JSONDecodeError:
            rows.append(ManifestRow(name, line, None, "malformed"))
            continue
        if not isinstance(doc, dict):
            rows.append(ManifestRow(name, line, None, "malformed"))
            continue
        rows.append(ManifestRow(name, line, {k: _clean(v) or "" for k, v in doc.items()}))
    return rows


def read_pending(location: Location, kind: str) -> tuple[list[str], list[ManifestRow]]:
    names = pending_manifests(location, kind)
    rows: list[ManifestRow] = []
    for name in names:
        rows += parse_manifest(name, location.read_bytes(name))
    return names, rows


def parse_time(value: str | None) -> datetime:
    """ISO 8601; a time without zone is UTC. Raises ValueError."""
    if not value:
        raise ValueError("empty timestamp")
    text = value.strip().replace("Z", "+00:00").replace("z", "+00:00")
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


# How far ahead of the sweep's clock a request may be dated. A share dated a year ahead
# would otherwise outrank every revoke until then, so a revoke could not take effect.
MAX_CLOCK_SKEW = timedelta(minutes=10)


def parse_request_time(value: str | None, now: datetime) -> datetime:
    """:func:`parse_time`, refusing a time more than :data:`MAX_CLOCK_SKEW` ahead of ``now``."""
    parsed = parse_time(value)
    if parsed > now + MAX_CLOCK_SKEW:
        raise ValueError("requested_at is in the future")
    return parsed


def content_hash(fields: dict[str, str], names: tuple[str, ...]) -> str:
    """A digest of a request's meaningful fields (to tell a replay from a reused id)."""
    canon = json.dumps({k: fields.get(k) or "" for k in names}, sort_keys=True)
    return hashlib.sha256(canon.encode()).hexdigest()[:32]


def archive_manifests(
    location: Location, kind: str, names: list[str], outcomes: dict[str, list[dict[str, Any]]]
) -> None:
    """Write each manifest's results beside it in ``processed/``, then move it there."""
    for name in names:
        base = posixpath.basename(name)
        results = "".join(json.dumps(r, default=str) + "\n" for r in outcomes.get(name, []))
        location.put_bytes(f"{kind}/{PROCESSED}/{base}.results.jsonl", results.encode())
        location.move(name, location, f"{kind}/{PROCESSED}/{base}")
