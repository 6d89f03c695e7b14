"""Each flow's runs as Prefect's API records them: the last run, the last failure and the
next scheduled run (``dropvault status``).

The API is the one the CLI's flows use: ``PREFECT_API_URL`` when set (a server and its
workers), else the embedded database under the home (``embedded_prefect_home``), which is
where ``dropvault demo`` and the other commands record their runs on a machine with no
server.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

FLOWS = (
    "ingest-drops",
    "apply-share-manifests",
    "deletion-sweep",
    "compile-beacon-stats",
    "reconcile-vault",
)
COLUMNS = (
    "flow",
    "last_state",
    "last_start",
    "last_seconds",
    "last_message",
    "last_failure_at",
    "last_failure",
    "next_run_at",
)
FINISHED = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
FAILED = ("FAILED", "CRASHED")


def _when(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


def _one_line(text: str | None, limit: int = 200) -> str | None:
    """A state message on one line, cut (it is an exception's first line; ours hold no PHI)."""
    if not text:
        return None
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def flow_runs(names: tuple[str, ...] = FLOWS) -> list[dict[str, Any]]:
    """One row per flow: ``flow, last_state, last_start, last_seconds, last_message,
    last_failure_at, last_failure, next_run_at`` (None where there is none)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    def runs(client: Any, name: str, states: tuple[str, ...], sort: FlowRunSort) -> list[Any]:
        return list(
            client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[name])),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(
                        type=FlowRunFilterStateType(any_=[StateType(s) for s in states])
                    )
                ),
                sort=sort,
                limit=1,
            )
        )

    out = []
    with get_client(sync_client=True) as client:
        for name in names:
            row: dict[str, Any] = dict.fromkeys(COLUMNS) | {"flow": name, "last_state": "never"}
            last = runs(client, name, (*FINISHED, "RUNNING"), FlowRunSort.START_TIME_DESC)
            if last:
                run = last[0]
                row["last_state"] = run.state_type.value if run.state_type else None
                row["last_start"] = _when(run.start_time)
                row["last_seconds"] = round(run.total_run_time.total_seconds(), 1)
                if run.state_type and run.state_type.value in FAILED:
                    row["last_message"] = _one_line(run.state.message if run.state else None)
            failed = runs(client, name, FAILED, FlowRunSort.START_TIME_DESC)
            if failed:
                row["last_failure_at"] = _when(failed[0].start_time or failed[0].end_time)
                row["last_failure"] = _one_line(
                    failed[0].state.message if failed[0].state else None
                )
            upcoming = runs(client, name, ("SCHEDULED",), FlowRunSort.EXPECTED_START_TIME_ASC)
            if upcoming:
                row["next_run_at"] = _when(upcoming[0].expected_start_time)
            out.append(row)
    return out
