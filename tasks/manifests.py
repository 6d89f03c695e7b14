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
import logging
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from dropvault.storage.catalog import Catalog
from dropvault.storage.errors import TerminalError
from dropvault.storage.keystore import Keystore
from dropvault.storage.locations import Location, is_file_problem, is_safe_name
from dropvault.tasks.phi import (
    REDACTED,
    quoted_uids,
    quotes_any,
    quotes_loosely,
    redact,
    redact_quotes,
    study_quotes,
)
from dropvault.tasks.reasons import RejectReason

log = logging.getLogger(__name__)
T = TypeVar("T")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")

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


def replay_outcome(known: dict[str, Any], request_id: str, digest: str) -> str | None:
    """For a request id seen before (``known``: id -> content digest): ``duplicate`` when
    it is the same request again, ``rejected:duplicate_request_id`` when the id was reused
    with other content; None for a new id."""
    if request_id not in known:
        return None
    if known[request_id] == digest:
        return "duplicate"
    return Rejected(RejectReason.DUPLICATE_REQUEST_ID).outcome


def pending_manifests(location: Location, kind: str) -> list[str]:
    """Manifests waiting under ``kind/`` (not in ``processed/``), oldest name first."""
    names = []
    for entry in location.list(kind):
        rel = entry.name[len(kind) + 1 :]
        if "/" in rel or rel.startswith(".") or not rel.endswith(SUFFIXES):
            continue
        if not is_safe_name(entry.name):
            # Not UTF-8: it cannot be named in the catalog or moved by name. Left in place,
            # without blocking the others; the operator renames it.
            log.warning("a %s manifest whose name is not valid UTF-8 is skipped", kind)
            continue
        names.append(entry.name)
    return sorted(names)


def _clean(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


# Values a request names things by, kept verbatim as keys of its history.
# The grantee too: an account is written verbatim to the audit log (a delivery's actor)
# and to the mailer's policy-notice batches, where deletion cannot reach it.
NAMED_BY_REQUESTER = ("request_id", "owner", "grantee")
UID_IN_NAME = re.compile(r"[0-9]+(?:\.[0-9]+){2,}")


def checked_row(
    validate: Callable[[ManifestRow, datetime], T], row: ManifestRow, now: datetime
) -> T:
    """One row's failure boundary: whatever goes wrong while a row is checked rejects that
    row (``rejected:malformed`` unless the check named a reason), never the manifest."""
    if row.fields and any(
        UID_IN_NAME.search(row.fields.get(name) or "") for name in NAMED_BY_REQUESTER
    ):
        # Ids and accounts are kept as they are (they key history): a UID there would
        # outlive the study's deletion.
        raise Rejected(RejectReason.UID_IN_NAME)
    try:
        return validate(row, now)
    except Rejected:
        raise
    except Exception as exc:  # noqa: BLE001 - the boundary: the other rows still apply
        # The type only: a message could quote the row's values.
        log.warning("manifest row on line %d rejected (%s)", row.line, type(exc).__name__)
        raise Rejected(RejectReason.MALFORMED) from None


def parse_manifest(name: str, raw: bytes) -> list[ManifestRow]:
    """Rows of one manifest; undecodable or malformed lines become rows with ``error``."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return [ManifestRow(name, 0, None, "malformed")]
    if name.endswith(".csv"):
        return _csv_rows(name, text)
    return _jsonl_rows(name, text)


# Every column a share or deletion manifest may have: a CSV header naming none of them is
# a file without a header (its first row would otherwise be taken for one and vanish).
KNOWN_FIELDS = frozenset(
    {"request_id", "action", "owner", "grantee", "study_uid", "requested_at"}
    | {"expires_at", "purpose", "keep_archive", "deliver"}
    | {"user", "age_public_key"}  # recipients manifests
)
TRUE = frozenset({"true", "1", "yes", "y"})
FALSE = frozenset({"false", "0", "no", "n", ""})


def _csv_rows(name: str, text: str) -> list[ManifestRow]:
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        return []
    except csv.Error:
        return [ManifestRow(name, 1, None, "malformed")]
    if not KNOWN_FIELDS & set(header):
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
        rows.append(_row(name, line, dict(zip(header, values, strict=True))))
    return rows


def _jsonl_rows(name: str, text: str) -> list[ManifestRow]:
    rows: list[ManifestRow] = []
    # Lines end at \n, \r\n or \r only (str.splitlines would also split at U+2028 inside
    # a JSON string, breaking one row in two and every line number after it).
    for line, text_line in enumerate(io.StringIO(text, newline=None), start=1):
        if not text_line.strip():
            continue
        try:
            doc = json.loads(text_line)
        except (ValueError, RecursionError):  # also: nesting too deep, an int too long
            rows.append(ManifestRow(name, line, None, "malformed"))
            continue
        if not isinstance(doc, dict):
            rows.append(ManifestRow(name, line, None, "malformed"))
            continue
        rows.append(_row(name, line, doc))
    return rows


def _row(name: str, line: int, doc: dict[str, Any]) -> ManifestRow:
    """A parsed row, or a malformed one when a key or value is not text the catalog can
    hold (JSON can escape a lone surrogate, ``"\\udce9"``, which no UTF-8 column takes)."""
    try:
        fields = {str(k): _clean(v) or "" for k, v in doc.items()}
        for key, value in fields.items():
            key.encode("utf-8")
            value.encode("utf-8")
    except (UnicodeEncodeError, ValueError, RecursionError):
        return ManifestRow(name, line, None, "malformed")
    if any(CONTROL.search(v) for v in fields.values()):
        return ManifestRow(name, line, None, "malformed")  # NUL, ESC, newlines: no id has them
    return ManifestRow(name, line, fields)


MAX_MANIFEST_BYTES = 256 << 20  # a share or deletion manifest larger than this is not read


def read_pending(location: Location, kind: str) -> tuple[list[str], list[ManifestRow]]:
    """Every pending manifest's rows. One that cannot be read (a symlink, a special file,
    no permission) is one ``rejected:unreadable`` row, and is archived like the others."""
    names = pending_manifests(location, kind)
    rows: list[ManifestRow] = []
    for name in list(names):
        try:
            if location.size(name) > MAX_MANIFEST_BYTES:
                rows.append(ManifestRow(name, 0, None, RejectReason.TOO_LARGE))
                continue  # read whole, it could exhaust memory; archived unread
            raw = location.read_bytes(name)
        except FileNotFoundError:
            # Gone since the listing (another sweep took it), or a link to nothing: skipped,
            # and never named (a manifest's name can quote a UID or a patient).
            log.warning("a %s manifest went away before it was read; skipped", kind)
            names.remove(name)
            continue
        except OSError as exc:
            if not is_file_problem(exc):
                raise  # the store's trouble, not the manifest's: the task retries
            rows.append(ManifestRow(name, 0, None, RejectReason.UNREADABLE))
            continue
        rows += parse_manifest(name, raw)
    return names, rows


# Times a request may carry: anything outside cannot be a real request, and the arithmetic
# done on it (a due time 24 h later, a zone shift) must not overflow.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9000, 1, 1, tzinfo=UTC)


def parse_time(value: str | None) -> datetime:
    """ISO 8601; a time without zone is UTC. Raises ValueError, also for a time outside
    :data:`EARLIEST` .. :data:`LATEST` (``9999-12-31T23:59:59-23:59`` is past year 9999 in
    UTC, which Python cannot hold)."""
    if not value:
        raise ValueError("empty timestamp")
    text = value.strip().replace("Z", "+00:00").replace("z", "+00:00")
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    try:
        parsed = parsed.astimezone(UTC)
    except OverflowError:
        raise ValueError("timestamp out of range") from None
    if not EARLIEST <= parsed < LATEST:
        raise ValueError("timestamp out of range")
    return parsed


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


def _free_name(location: Location, folder: str, base: str) -> str:
    stem, suffix = posixpath.splitext(base)
    n, candidate = 1, base
    while location.exists(f"{folder}/{candidate}"):
        n += 1
        candidate = f"{stem}.{n}{suffix}"
    return candidate


def _clear_processed(location: Location, kind: str) -> None:
    """A file that sits where the ``processed/`` folder goes (an upload named ``processed``)
    would stop every archive: it is moved aside under a free name, nothing lost."""
    folder = f"{kind}/{PROCESSED}"
    if location.is_object_store or not location.fs.isfile(location.path(folder)):
        return
    aside = _free_name(location, kind, f"{PROCESSED}.file")
    log.warning(
        "a file named %s/%s was in the way of the archive: moved to %s", *(kind, PROCESSED, aside)
    )
    location.move(folder, location, f"{kind}/{aside}", unchecked=True)


UID_TOKEN = re.compile(r"[0-9]+(?:\.[0-9]+)+")


def uid_tokens(rows: list[ManifestRow]) -> list[str]:
    """Every UID-shaped token in the rows' values (a study UID can be quoted anywhere)."""
    found = {
        token
        for r in rows
        if r.fields
        for value in r.fields.values()
        if value
        for token in UID_TOKEN.findall(value)
    }
    return sorted(found)


def redact_rows(rows: list[ManifestRow], replacements: dict[str, str]) -> list[ManifestRow]:
    """Rows with each deleted study's UID, wherever a value quotes it (study_uid, purpose,
    grantee, ...), replaced by its tombstone key: a request that names a deleted study is
    recorded (and refused, ``study_deleted``) without the UID. The request id is kept."""
    if not replacements:
        return rows
    out = []
    for r in rows:
        if not r.fields:
            out.append(r)
            continue
        fields = {
            k: v if k == "request_id" or not v else redact(v, replacements)
            for k, v in r.fields.items()
        }
        out.append(r if fields == r.fields else ManifestRow(r.manifest, r.line, fields, r.error))
    return out


def archive_manifests(
    location: Location,
    kind: str,
    names: list[str],
    outcomes: dict[str, list[dict[str, Any]]],
    replacements: dict[str, str] | None = None,
) -> None:
    """Write each manifest's results beside it in ``processed/``, then move it there. A name
    already in ``processed/`` (an owner's portal reusing ``requests.jsonl``) gets a number
    (``requests.2.jsonl``) instead of replacing the earlier manifest and its results."""
    if names:
        _clear_processed(location, kind)
    for name in names:
        own = redact(posixpath.basename(name), replacements or {})  # a name can quote a UID
        base = _free_name(location, f"{kind}/{PROCESSED}", own)
        results = "".join(json.dumps(r, default=str) + "\n" for r in outcomes.get(name, []))
        results = redact(results, replacements or {})
        location.put_bytes(f"{kind}/{PROCESSED}/{base}.results.jsonl", results.encode())
        redacted = _redacted(location, name, replacements) if replacements else None
        if redacted is not None:
            # It names a study deleted already: archived with the tombstone key instead.
            location.rewrite(f"{kind}/{PROCESSED}/{base}", redacted)
            location.delete(name)
            continue
        location.move(name, location, f"{kind}/{PROCESSED}/{base}")


# Folders of the manifests location whose files can quote a study UID once processed.
QUOTING_FOLDERS = ("shares", "deletions", "incidents")


def redact_manifests(
    location: Location,
    replacements: dict[str, str],
    quotes: dict[str, list[str]] | None = None,
) -> int:
    """Rewrite every processed manifest, results file and incident file that quotes a
    deleted study's UID (or one of its series or instances), with its tombstone key instead
    (each file atomically, no earlier version kept). A file that names one of the studies
    in ``quotes`` (in its text, JSON escapes decoded, or its name) loses that patient's name
    and ID everywhere in it and in its name, and so does its results file. Pending
    manifests are left to their flow, which archives them redacted. Returns how many files
    were rewritten."""
    if not replacements:
        return 0
    quotes = quotes or {}
    changed = 0
    for folder in QUOTING_FOLDERS:
        names = [
            e.name
            for e in location.list(folder)
            if not e.problem
            and is_safe_name(e.name)
            and (folder == "incidents" or e.name[len(folder) + 1 :].startswith(PROCESSED + "/"))
        ]
        results = {n for n in names if n.endswith(RESULTS)}
        for name in sorted(set(names) - results):
            text = _decoded(location.read_bytes(name).decode("utf-8", "surrogateescape"))
            named = quoted_uids(text, quotes) | quoted_uids(name, quotes)
            quoted = sorted({q for u in named for q in quotes[u]})
            new = _renamed(location, name, replacements, quoted)
            changed += _rewrite(location, name, new, replacements, quoted)
            if name + RESULTS in results:
                results.discard(name + RESULTS)
                changed += _rewrite(location, name + RESULTS, new + RESULTS, replacements, quoted)
        for name in sorted(results):  # results whose manifest is gone
            new = _renamed(location, name, replacements, [])
            changed += _rewrite(location, name, new, replacements, [])
    return changed


RESULTS = ".results.jsonl"


def _renamed(location: Location, name: str, replacements: dict[str, str], quoted: list[str]) -> str:
    """The name a file gets once its UIDs and patient quotes are out of it (a free one)."""
    folder, base = posixpath.split(name)
    new = redact_quotes(redact(base, replacements), quoted).replace(REDACTED, "redacted")
    if new == base:
        return name
    if new.endswith(RESULTS):
        return f"{folder}/{new}"  # its manifest's new name decided it
    return f"{folder}/{_free_name(location, folder, new)}"


def _rewrite(
    location: Location, name: str, new: str, replacements: dict[str, str], quoted: list[str]
) -> int:
    redacted = _redacted(location, name, replacements, quoted)
    if new != name:
        location.rewrite(new, redacted if redacted is not None else location.read_bytes(name))
        location.delete(name)
        return 1
    if redacted is not None:
        location.rewrite(name, redacted)
        return 1
    return 0


def _decoded(text: str) -> str:
    """``text`` with JSON's ``\\u0041``-style escapes written out as the characters, so a UID or
    a name spelled with escapes is found, and redacted."""
    if "\\u" not in text:
        return text
    return _ESCAPE.sub(_unescape, text)


_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")


def _unescape(match: re.Match[str]) -> str:
    code = int(match.group(1), 16)
    # Kept escaped: what would break the line's JSON (controls, quote, backslash) or
    # cannot be UTF-8 (a lone surrogate); none of them spells a UID or a name.
    keep = code < 0x20 or code in (0x22, 0x5C) or 0xD800 <= code <= 0xDFFF
    return match.group(0) if keep else chr(code)


def _redacted(
    location: Location,
    name: str,
    replacements: dict[str, str],
    quoted: list[str] | None = None,
) -> bytes | None:
    """The file's bytes with the identifiers (and ``quoted``) replaced, or None when it
    quotes none."""
    original = location.read_bytes(name).decode("utf-8", "surrogateescape")
    text = _decoded(original)
    if not any(u in text for u in replacements) and not (quoted and quotes_any(text, quoted)):
        return None
    new = redact(redact_quotes(text, quoted or []), replacements)
    return None if new == original else new.encode("utf-8", "surrogateescape")


def refuse_phi_in_names(
    catalog: Catalog, keystore: Keystore, rows: list[ManifestRow]
) -> list[ManifestRow]:
    """Rows whose request id, owner or grantee quotes the study they name (for ``*``, any
    study of the owner) become ``rejected:uid_in_name`` rows, and those that quote its
    patient (name or ID) ``rejected:phi_in_name`` rows, however the quote is separated,
    cased or encoded (:func:`~dropvault.tasks.phi.quotes_loosely`): ids and accounts key a
    request's history verbatim, and an account is written to the audit log and to the
    mailer's batches, so a quote there would outlive the study's deletion."""
    asked = [r.fields for r in rows if r.fields]
    named = {f.get("study_uid") or "" for f in asked} - {"", "*"}
    owners = sorted({f.get("owner") or "" for f in asked if f.get("study_uid") == "*"})
    owned = catalog.query(
        "SELECT owner, study_uid FROM studies WHERE owner IN (SELECT unnest(?::VARCHAR[]))",
        [owners],
    )
    studies_of: dict[str, list[str]] = {}
    for owner, uid in owned.itertuples(index=False):
        studies_of.setdefault(str(owner), []).append(str(uid))
    found = study_quotes(catalog, keystore, sorted(named | set(map(str, owned["study_uid"]))))
    out = []
    for r in rows:
        f = r.fields or {}
        uid = f.get("study_uid") or ""
        covered = studies_of.get(f.get("owner") or "", []) if uid == "*" else [uid]
        quoted = [q for u in covered for q in found.get(u, [])]
        names = [f.get(n) or "" for n in NAMED_BY_REQUESTER]
        if any(quotes_loosely(n, covered) for n in names):
            out.append(ManifestRow(r.manifest, r.line, None, RejectReason.UID_IN_NAME))
        elif quoted and any(quotes_loosely(n, quoted) for n in names):
            out.append(ManifestRow(r.manifest, r.line, None, RejectReason.PHI_IN_NAME))
        else:
            out.append(r)
    return out
