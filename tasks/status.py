"""One look at a home for an operator: table counts, drops waiting (why, how long),
pending manifests, the deletion SLA and quarantine by reason. Each flow's runs come from
Prefect's API (``dropvault.flows.runs``), not from the catalog."""

from __future__ import annotations

import time
from typing import Any

import pandas as pd

from dropvault.storage.catalog import Catalog, tables
from dropvault.storage.home import Home
from dropvault.tasks.drops import Drop, scan_drops
from dropvault.tasks.manifests import pending_manifests

TABLES = tables()  # every table of the schema (storage/schema), not a list kept by hand


def table_counts(catalog: Catalog) -> dict[str, int]:
    """Rows per catalog table (one read-only connection)."""
    reader = catalog.read_only()
    present = [t for t in TABLES if t in set(reader.tables())]
    frames = reader.many([(f"SELECT count(*) FROM {t}", None) for t in present])  # noqa: S608
    return {t: int(str(df.iloc[0, 0])) for t, df in zip(present, frames, strict=True)}


def _frame(rows: list[dict[str, Any]], columns: list[str]) -> pd.DataFrame:
    """Rows as they are (ints stay ints, for JSON), in the given column order."""
    return pd.DataFrame(rows, columns=columns, dtype=object)


def waiting_rows(drops: list[Drop], now: float) -> list[dict[str, Any]]:
    """Each drop not ready, by keyed id (folder names can hold PHI): why, age, and the
    seconds until it goes incomplete."""
    return [
        {
            "facility_id": d.facility_id,
            "drop_id": d.drop_id,
            "state": d.state,
            "why": d.why,
            "files": len(d.files),
            "missing": len(d.missing),
            "age_seconds": round(now - d.first_seen) if d.first_seen else None,
            "incomplete_in_seconds": (
                max(0, round(d.incomplete_at - now)) if d.incomplete_at is not None else None
            ),
        }
        for d in drops
        if d.state != "ready"
    ]


def home_status(
    home: Home, quiet_seconds: float, incomplete_seconds: float, now: float | None = None
) -> dict[str, pd.DataFrame]:
    """Sections of the home's state, each a small table:

    - ``tables``: rows per catalog table;
    - ``drops``: drops in the drop zone by state (ready, waiting, incomplete);
    - ``waiting``: each drop not ready, by keyed id (folder names can hold PHI), with why,
      its age and the seconds until it goes incomplete;
    - ``manifests``: pending share and deletion manifests;
    - ``deletion_sla`` and ``quarantine``: requests by SLA state, files by reason.
    """
    now = time.time() if now is None else now
    counts = table_counts(home.catalog)
    reader = home.catalog.read_only()
    sla, quarantine = reader.many(
        [
            ("SELECT sla_state, count(*) AS n FROM deletion_sla GROUP BY 1 ORDER BY 1", None),
            ("SELECT reason, count(*) AS n FROM quarantine GROUP BY 1 ORDER BY 2 DESC, 1", None),
        ]
    )
    drops = scan_drops(
        home.drops, home.pepper, now, quiet_seconds, incomplete_seconds, home.catalog
    )
    waiting = waiting_rows(drops, now)
    return {
        "tables": _frame([{"table": t, "rows": n} for t, n in counts.items()], ["table", "rows"]),
        "drops": _frame(
            [
                {"state": s, "drops": sum(1 for d in drops if d.state == s)}
                for s in ("ready", "waiting", "incomplete")
            ],
            ["state", "drops"],
        ),
        "waiting": _frame(
            waiting,
            [
                "facility_id",
                "drop_id",
                "state",
                "why",
                "files",
                "missing",
                "age_seconds",
                "incomplete_in_seconds",
            ],
        ),
        "manifests": _frame(
            [
                {"kind": k, "pending": len(pending_manifests(home.manifests, k))}
                for k in ("shares", "deletions")
            ],
            ["kind", "pending"],
        ),
        "deletion_sla": _frame(
            [
                {"sla_state": str(s), "requests": int(n)}
                for s, n in zip(sla.iloc[:, 0], sla.iloc[:, 1], strict=True)
            ],
            ["sla_state", "requests"],
        ),
        "quarantine": _frame(
            [
                {"reason": str(r), "files": int(n)}
                for r, n in zip(quarantine.iloc[:, 0], quarantine.iloc[:, 1], strict=True)
            ],
            ["reason", "files"],
        ),
    }
