"""Policy-change notices: who must be told of a material change to the network's policy.

Each policy version is one JSON file under ``{manifests}/policy/``::

    {"version": "2026-12", "effective_on": "2026-12-31", "material": true,
     "text_sha256": "<SHA-256 of the policy's published text>"}

A version is recorded once (``policy_versions``); a file that changes a recorded version,
or that is malformed, is rejected with its reason (``policy_rejects``) while the others
apply; a published version is never edited: publish a new one.

For a **material** version, :func:`send_notices` computes every account to notify:

* owners with studies (active or archived: an owner keeps rights over an archive);
* grantees whose grant is in force or ended within :data:`RECENT` (90 days);
* newsletter subscribers. dropvault does not hold the mailing list (only the keyed
  suppression list), so the version's first batch carries an instruction for the mailer:
  send to every subscriber, **suppression list not applied**, since an unsubscribe from
  the newsletter does not exempt anyone from a material notice.

Each account is recorded once per version (``policy_notices``), so a rerun adds nobody
twice; accounts that become eligible later are added until the version takes effect
(after that, a new account signs up under it). The notices go to the outbox as a batch
(``policy/<version>/<batch>.jsonl``), written after its rows commit and rewritten by the
next run if a crash came in between (the same name, the same content). A non-material
version notifies nobody.
"""

from __future__ import annotations

import functools
import hashlib
import json
import posixpath
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import duckdb
import pandas as pd

from dropvault.storage.catalog import Catalog, insert_rows
from dropvault.storage.home import Home
from dropvault.storage.locations import Location, is_file_problem
from dropvault.tasks.audit import audit
from dropvault.tasks.manifests import UID_IN_NAME

KIND = "policy"
RECENT = timedelta(days=90)
MAX_FILE_BYTES = 64 * 1024
VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SHA256 = re.compile(r"[0-9a-f]{64}")
NEWSLETTER = {
    "audience": "newsletter_subscribers",
    "include_unsubscribed": True,
    "why": "a material policy change: an unsubscribe does not exempt anyone",
}


@dataclass(frozen=True)
class PolicyVersion:
    version: str
    effective_on: date
    material: bool
    text_sha256: str
    file: str


@dataclass
class PolicyResult:
    """What one run recorded and sent."""

    versions: list[str] = field(default_factory=list)  # newly recorded
    rejected: dict[str, int] = field(default_factory=dict)  # by reason
    notified: dict[str, int] = field(default_factory=dict)  # accounts added, by version
    batches: list[str] = field(default_factory=list)  # outbox names written

    def summary(self) -> dict[str, Any]:
        return {
            "versions_recorded": len(self.versions),
            "files_rejected": sum(self.rejected.values()),
            "rejected_by_reason": dict(sorted(self.rejected.items())),
            "accounts_notified": sum(self.notified.values()),
            "batches_written": len(self.batches),
        }


class _Rejected(ValueError):
    pass


def parse_policy(name: str, raw: bytes) -> PolicyVersion:
    """One policy file, checked; raises ``_Rejected`` with the reason code."""
    try:
        doc = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _Rejected("malformed") from None
    if not isinstance(doc, dict):
        raise _Rejected("malformed")
    if any(doc.get(k) in (None, "") for k in ("version", "effective_on", "text_sha256")):
        raise _Rejected("missing_field")
    if "material" not in doc:
        raise _Rejected("missing_field")
    version = doc["version"]
    if (
        not isinstance(version, str)
        or not VERSION.fullmatch(version)
        or UID_IN_NAME.search(version)
    ):
        raise _Rejected("bad_version")  # it names a folder of the outbox, and is kept as is
    try:
        effective = date.fromisoformat(str(doc["effective_on"]))
    except ValueError:
        raise _Rejected("bad_timestamp") from None
    if not isinstance(doc["material"], bool):
        raise _Rejected("bad_material")  # true or false, not a string that looks like one
    sha = doc["text_sha256"]
    if not isinstance(sha, str) or not SHA256.fullmatch(sha):
        raise _Rejected("bad_sha256")
    return PolicyVersion(version, effective, doc["material"], sha, name)


def read_policy_files(
    location: Location,
) -> tuple[list[PolicyVersion], list[tuple[str, str, str]]]:
    """Every policy file's version, and (file, content hash, reason) for each refused."""
    good: list[PolicyVersion] = []
    bad: list[tuple[str, str, str]] = []
    for entry in sorted(location.list(KIND, recursive=False), key=lambda e: e.name):
        name = entry.name
        if not name.endswith(".json") or posixpath.basename(name).startswith("."):
            continue
        if entry.size > MAX_FILE_BYTES:
            bad.append((name, f"size:{entry.size}", "too_large"))
            continue
        try:
            raw = location.read_bytes(name)
        except FileNotFoundError:
            continue
        except OSError as exc:
            if not is_file_problem(exc):
                raise
            bad.append((name, "unreadable", "unreadable"))
            continue
        try:
            good.append(parse_policy(name, raw))
        except _Rejected as exc:
            bad.append((name, hashlib.sha256(raw).hexdigest(), str(exc)))
    return good, bad


def record_versions(
    catalog: Catalog,
    good: list[PolicyVersion],
    bad: list[tuple[str, str, str]],
    now: datetime,
) -> PolicyResult:
    """Record new versions; a file that changes a recorded version is rejected."""
    result = PolicyResult()

    def work(con: duckdb.DuckDBPyConnection) -> None:
        rejects = list(bad)
        for doc in good:
            known = con.execute(
                "SELECT effective_on, material, text_sha256 FROM policy_versions WHERE version = ?",
                [doc.version],
            ).fetchone()
            if known is None:
                row = {**doc.__dict__, "recorded_at": now}
                insert_rows(con, "policy_versions", [row])
                audit(
                    con,
                    actor="policy",
                    action="policy_version",
                    subject=doc.version,
                    detail={"material": doc.material, "effective_on": str(doc.effective_on)},
                    at=now,
                )
                result.versions.append(doc.version)
            elif tuple(known) != (doc.effective_on, doc.material, doc.text_sha256):
                rejects.append((doc.file, doc.text_sha256, "version_conflict"))
        rows = [
            {"file": f, "content_sha": h, "reason": r, "recorded_at": now} for f, h, r in rejects
        ]
        insert_rows(con, "policy_rejects", rows, ignore_existing=True)
        for _, _, reason in rejects:
            result.rejected[reason] = result.rejected.get(reason, 0) + 1

    catalog.write(work)
    return result


# A grant ends at its revocation or its expiry, whichever came first (NULL: in force).
ACCOUNTS = """
SELECT account, min(role) AS role FROM (
    SELECT DISTINCT owner AS account, 'owner' AS role FROM studies
    WHERE status IN ('active', 'archived')
    UNION ALL
    SELECT DISTINCT grantee, 'grantee' FROM (
        SELECT grantee, CASE WHEN revoked_at IS NOT NULL
                              AND (expires_at IS NULL OR revoked_at < expires_at)
                             THEN revoked_at ELSE expires_at END AS ended
        FROM grants
    ) WHERE ended IS NULL OR ended >= ?
) GROUP BY account ORDER BY account
"""


def _notify_version(
    con: duckdb.DuckDBPyConnection, version: str, now: datetime
) -> tuple[str, int] | None:
    """Add the version's accounts not yet notified as one batch; returns (batch, count)."""
    accounts = con.execute(ACCOUNTS, [now - RECENT]).df()
    done = {
        str(a)
        for (a,) in con.execute(
            "SELECT account FROM policy_notices WHERE version = ?", [version]
        ).fetchall()
    }
    new = accounts[~accounts["account"].isin(done)]
    first = not con.execute("SELECT 1 FROM policy_batches WHERE version = ?", [version]).fetchone()
    if new.empty and not first:
        return None
    batch_id = uuid.uuid4().hex
    rows = [
        {"version": version, "account": a, "role": r, "batch_id": batch_id, "notified_at": now}
        for a, r in zip(new["account"], new["role"], strict=True)
    ]
    insert_rows(con, "policy_notices", rows)
    batch = {"batch_id": batch_id, "version": version, "accounts": len(rows), "created_at": now}
    insert_rows(con, "policy_batches", [batch])
    audit(
        con,
        actor="policy",
        action="policy_notice",
        subject=version,
        detail={"batch_id": batch_id, "accounts": len(rows)},
        at=now,
    )
    return batch_id, len(rows)


def batch_name(version: str, batch_id: str) -> str:
    return f"{KIND}/{version}/{batch_id}.jsonl"


def _marker(batch_id: str, now: datetime) -> Callable[[duckdb.DuckDBPyConnection], None]:
    def mark(con: duckdb.DuckDBPyConnection) -> None:
        con.execute("UPDATE policy_batches SET written_at = ? WHERE batch_id = ?", [now, batch_id])

    return mark


def _write_batches(home: Home, now: datetime) -> list[str]:
    """Write every batch whose rows committed but whose file is not yet in the outbox."""
    pending = home.catalog.query(
        "SELECT b.batch_id, b.version, v.effective_on, v.text_sha256,"
        " b.created_at = (SELECT min(created_at) FROM policy_batches x"
        "  WHERE x.version = b.version) AS first"
        " FROM policy_batches b JOIN policy_versions v USING (version)"
        " WHERE b.written_at IS NULL ORDER BY b.created_at"
    )
    written = []
    for b in pending.itertuples(index=False):
        rows = home.catalog.query(
            "SELECT account, role FROM policy_notices WHERE batch_id = ? ORDER BY account",
            [b.batch_id],
        )
        head = {
            "kind": "policy_notice",
            "version": b.version,
            "effective_on": str(b.effective_on),
            "text_sha256": b.text_sha256,
        }
        lines = [json.dumps(head)]
        if b.first:
            lines.append(json.dumps(NEWSLETTER))
        lines += [json.dumps({"account": a, "role": r}) for a, r in rows.values.tolist()]
        name = batch_name(str(b.version), str(b.batch_id))
        home.outbox.put_bytes(name, ("\n".join(lines) + "\n").encode())
        home.catalog.write(_marker(str(b.batch_id), now))
        written.append(name)
    return written


def send_notices(home: Home, now: datetime | None = None) -> PolicyResult:
    """Record the policy files' versions, then notify every account due a notice of each
    material version (see the module's docstring); returns what was done."""
    now = now or datetime.now(UTC)
    result = record_versions(home.catalog, *read_policy_files(home.manifests), now)
    versions = home.catalog.query(
        "SELECT version FROM policy_versions v WHERE material AND (effective_on >= ?::DATE"
        " OR NOT EXISTS (SELECT 1 FROM policy_batches b WHERE b.version = v.version))"
        " ORDER BY effective_on, version",
        [now.date()],
    )
    for version in versions["version"]:
        made = home.catalog.write(functools.partial(_notify_version, version=str(version), now=now))
        if made is not None:
            result.notified[str(version)] = made[1]
    result.batches = _write_batches(home, now)
    return result


def policy_versions(catalog: Catalog) -> pd.DataFrame:
    """Each version and its counts: accounts notified (owners, grantees) and batches."""
    return catalog.query(
        "SELECT v.version, v.effective_on, v.material, v.text_sha256,"
        " count(n.account) AS notified,"
        " count(n.account) FILTER (WHERE n.role = 'owner') AS owners,"
        " count(n.account) FILTER (WHERE n.role = 'grantee') AS grantees,"
        " count(DISTINCT n.batch_id) AS batches, v.recorded_at"
        " FROM policy_versions v LEFT JOIN policy_notices n USING (version)"
        " GROUP BY ALL ORDER BY v.effective_on, v.version"
    )
