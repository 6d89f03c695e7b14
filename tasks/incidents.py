"""Incidents (P5): a report of access to someone else's records is traced, the grant that
allowed it is revoked, and a breach worksheet with its 60-day deadline is written."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import duckdb
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from dropvault.storage.catalog import Catalog, insert_rows
from dropvault.storage.locations import Location
from dropvault.tasks.audit import audit
from dropvault.tasks.sharing import GrantEvent, recompute_grants

NOTIFY_WITHIN = timedelta(days=60)
# A report is filed as a request file, and the flow takes only its id: the study UID
# never becomes a flow-run parameter in the orchestrator's database.
REQUESTS = "incidents/requests"


def file_incident_request(
    manifests: Location, user: str, study_uid: str, reported_at: datetime
) -> str:
    """Write a wrong-access report under ``{manifests}/incidents/requests/``; returns its id
    (what ``report_wrong_access`` takes)."""
    request_id = "ir_" + uuid.uuid4().hex[:16]
    doc = {"user": user, "study_uid": study_uid, "reported_at": reported_at.isoformat()}
    manifests.put_bytes(f"{REQUESTS}/{request_id}.json", json.dumps(doc).encode())
    return request_id


def read_incident_request(manifests: Location, request_id: str) -> tuple[str, str, datetime]:
    """``(user, study_uid, reported_at)`` of a filed report."""
    if not request_id.startswith("ir_") or not request_id[3:].isalnum():
        raise ValueError("an incident request id looks like ir_<hex>")
    try:
        doc = json.loads(manifests.read_bytes(f"{REQUESTS}/{request_id}.json"))
    except FileNotFoundError:
        raise LookupError(f"no incident request {request_id}") from None
    return str(doc["user"]), str(doc["study_uid"]), datetime.fromisoformat(doc["reported_at"])


def summary_markdown(incident: Incident, report_name: str) -> str:
    """What the orchestrator keeps of an incident (its artifact): counts and dates, no
    study identifier; the worksheet itself is ``report_name`` in the manifests location."""
    return (
        f"# Incident {incident.incident_id}\n\n"
        f"- Grants revoked: {len(incident.revoked)}\n"
        f"- People who had access: {len(incident.people)}\n"
        f"- Notification deadline: **{incident.notify_by.date().isoformat()}**\n"
        f"- Worksheet: `{report_name}` (in the manifests location)\n"
    )


@dataclass
class Incident:
    incident_id: str
    reported_user: str
    study_uid: str
    reported_at: datetime
    notify_by: datetime
    revoked: list[dict[str, Any]]
    people: list[dict[str, Any]]
    report_md: str


def _revoke_grants(
    con: duckdb.DuckDBPyConnection,
    incident_id: str,
    owner: str,
    user: str,
    study_uid: str,
    now: datetime,
) -> pd.DataFrame:
    """Revoke every grant that gave ``user`` the study; returns those grants."""
    grants = con.execute(
        "SELECT owner, grantee, study_uid, granted_at, expires_at, grant_request_id FROM grants"
        " WHERE owner = ? AND grantee = ? AND (study_uid = ? OR study_uid = '*')"
        " AND revoked_at IS NULL",
        [owner, user, study_uid],
    ).df()
    events = [
        GrantEvent(
            event_id=f"incident:{incident_id}:{i}",
            action="revoke",
            owner=str(g.owner),
            grantee=str(g.grantee),
            study_uid=str(g.study_uid),
            requested_at=now,
            expires_at=None,
            actor="incident",
            reason="incident",
            recorded_at=now,
        )
        for i, g in enumerate(grants.itertuples())
    ]
    insert_rows(con, "grant_events", [e.row() for e in events])
    recompute_grants(con, {(owner, user)})
    return grants


def report_markdown(
    incident: Incident, owner: str, now: datetime, people: pd.DataFrame, access_now: pd.DataFrame
) -> str:
    """The breach worksheet: timeline, grants involved, who had and who has access."""
    lines = [
        f"# Incident {incident.incident_id}",
        "",
        f"- Study: `{incident.study_uid}` (owner `{owner}`)",
        f"- Reported user: `{incident.reported_user}`",
        f"- Reported / discovered: {incident.reported_at.isoformat()}",
        "- Notification deadline (discovery + 60 days):"
        f" **{incident.notify_by.date().isoformat()}**",
        "",
        "## Timeline",
        "",
        f"- {incident.reported_at.isoformat()}: access reported",
        f"- {now.isoformat()}: {len(incident.revoked)} grant(s) revoked (reason `incident`)",
        "",
        "## Grants involved",
        "",
        "| owner | grantee | scope | granted_at | expires_at |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {g['owner']} | {g['grantee']} | {'all' if g['study_uid'] == '*' else 'study'}"
        f" | {g['granted_at']} | {g['expires_at'] or ''} |"
        for g in incident.revoked
    ] or ["| (none active) | | | | |"]
    lines += [
        "",
        "## People who had access",
        "",
        "| user | first granted | last event |",
        "|---|---|---|",
    ]
    lines += [f"| {p.user_id} | {p.first_granted} | {p.last_event} |" for p in people.itertuples()]
    lines += ["", "## Access now", "", "| user | via |", "|---|---|"]
    lines += [f"| {a.user_id} | {a.via} |" for a in access_now.itertuples()]
    return "\n".join(lines) + "\n"


def open_incident(
    con: duckdb.DuckDBPyConnection, user: str, study_uid: str, reported_at: datetime, now: datetime
) -> Incident:
    """Trace and revoke every grant that gave ``user`` access to the study; write the incident."""
    found = con.execute("SELECT owner FROM studies WHERE study_uid = ?", [study_uid]).fetchone()
    if found is None:
        raise LookupError("no such study in the catalog")
    owner = found[0]
    incident_id = "inc_" + uuid.uuid4().hex[:16]
    grants = _revoke_grants(con, incident_id, owner, user, study_uid, now)
    people = con.execute(
        "SELECT grantee AS user_id, min(requested_at) AS first_granted,"
        " max(requested_at) AS last_event FROM grant_events"
        " WHERE owner = ? AND (study_uid = ? OR study_uid = '*') AND action = 'share'"
        " GROUP BY 1 ORDER BY 1",
        [owner, study_uid],
    ).df()
    access_now = con.execute(
        "SELECT user_id, via FROM study_access WHERE study_uid = ? ORDER BY 1", [study_uid]
    ).df()
    incident = Incident(
        incident_id,
        user,
        study_uid,
        reported_at,
        reported_at + NOTIFY_WITHIN,
        revoked=[
            {str(k): (None if pd.isna(v) else v) for k, v in g.items()}
            for g in grants.to_dict(orient="records")
        ],
        people=[{str(k): v for k, v in p.items()} for p in people.to_dict(orient="records")],
        report_md="",
    )
    incident.report_md = report_markdown(incident, owner, now, people, access_now)
    insert_rows(
        con,
        "incidents",
        [
            {
                "incident_id": incident_id,
                "reported_user": user,
                "study_uid": study_uid,
                "reported_at": reported_at,
                "discovered_at": reported_at,
                "notify_by": incident.notify_by,
                "grants_revoked": len(grants),
                "people_affected": len(people),
                "report_md": incident.report_md,
            }
        ],
    )
    audit(
        con,
        actor="incident",
        action="revoke_grants",
        subject=incident_id,
        detail={"grants_revoked": len(grants)},
        at=now,
    )
    return incident


def report_incident(
    catalog: Catalog, user: str, study_uid: str, reported_at: datetime, now: datetime
) -> Incident:
    return catalog.write(lambda con: open_incident(con, user, study_uid, reported_at, now))


report_incident_task = task(name="report-incident", cache_policy=NO_CACHE)(report_incident)
