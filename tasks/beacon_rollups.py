"""Weekly and monthly beacon hits, audited together with the days they cover (P7).

A rollup is compiled from the days' cells as they were before folding (kept by each day's
compile under ``{beacons}/cells/``), never by adding published days. Its audit is one
:class:`~dropvault.tasks.disclosure.DisclosureSystem` whose variables are those cells
(each at least 1), in which every number already published for those days (their
``beacon_stats`` hits, ``beacon_days`` counters, the newsletter rows they added) and, for a
month, for its weeks is fixed as shown or hidden, and the period's own rows are the only
ones the audit may hide. So the difference between a week and its days pins nothing.

Decisions (README, "Weekly and monthly rollups"):

- Weeks are the month's days 1-7, 8-14, 15-21 and 22 to its end, so a week lies in one
  month and every audit is closed: a month is audited with its days and its weeks, a week
  with its days. A period is compiled once its last day is past (UTC), and not again.
- A label is kept in a period if some day of it kept it (11 or more distinct visitors that
  day, or a campaign of that day's sends file); otherwise it is folded into ``{other}``.
- Rollups publish hits only: distinct visitors over a period cannot be had from the days'
  cells without keeping visitor ids, which are never stored.
- A day compiled after its week or month was published is not in it; ``days`` lists the
  days a rollup covers. Once a month is published, its days' cells are deleted.
"""

from __future__ import annotations

import calendar
import logging
from collections.abc import Hashable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import duckdb
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from dropvault.storage.catalog import Catalog, insert_rows
from dropvault.storage.errors import retry_transient
from dropvault.storage.locations import Location
from dropvault.tasks.audit import audit as audit_event
from dropvault.tasks.beacon_tables import EMAIL, MIN_VISITORS, OPERATIONAL, OTHER, TOTAL
from dropvault.tasks.disclosure import AuditResult, DisclosureError, DisclosureSystem

log = logging.getLogger(__name__)
CELLS = "cells"
WEEK_STARTS = (1, 8, 15, 22)

Period = tuple[str, date, date]  # kind, first day, last day


@dataclass
class RollupStats:
    period: str
    first_day: str
    days: int
    cells: int = 0
    suppressed: int = 0
    secondary: int = 0
    audit_seconds: float = 0.0


def periods_of(month: date) -> list[Period]:
    """The month's weeks, then the month (the order they are compiled in)."""
    last = month.replace(day=calendar.monthrange(month.year, month.month)[1])
    weeks: list[Period] = []
    for i, start in enumerate(WEEK_STARTS):
        end = month.replace(day=WEEK_STARTS[i + 1] - 1) if i + 1 < len(WEEK_STARTS) else last
        weeks.append(("week", month.replace(day=start), end))
    return [*weeks, ("month", month, last)]


def cell_days(beacons: Location) -> list[date]:
    days = []
    for entry in beacons.list(CELLS):
        stem = entry.name.rsplit("/", 1)[-1].removesuffix(".parquet")
        try:
            days.append(date.fromisoformat(stem))
        except ValueError:
            continue
    return sorted(days)


def due_periods(beacons: Location, catalog: Catalog, today: date) -> list[Period]:
    """Periods whose last day is past, with compiled days, not yet published."""
    published = {
        (r.period, r.first_day)
        for r in catalog.query(
            "SELECT DISTINCT period, strftime(first_day, '%Y-%m-%d') AS first_day"
            " FROM beacon_rollups"
        ).itertuples()
    }
    days = cell_days(beacons)
    months = sorted({d.replace(day=1) for d in days})
    due = []
    for month in months:
        for kind, first, last in periods_of(month):
            has_days = any(first <= d <= last for d in days)
            if has_days and last < today and (kind, first.isoformat()) not in published:
                due.append((kind, first, last))
    return due


def compile_rollups(
    beacons: Location, catalog: Catalog, today: date, audit_seconds: float = 120.0
) -> list[RollupStats]:
    """Compile every due period, weeks before their month; then delete the cells of the
    months that are published."""
    due = due_periods(beacons, catalog, today)
    out = [compile_period(beacons, catalog, p, audit_seconds) for p in due]
    done = {
        r.first_day
        for r in catalog.query(
            "SELECT DISTINCT strftime(first_day, '%Y-%m-%d') AS first_day FROM beacon_rollups"
            " WHERE period = 'month'"
        ).itertuples()
    }
    for day in cell_days(beacons):
        if day.replace(day=1).isoformat() in done:
            beacons.delete(f"{CELLS}/{day.isoformat()}.parquet")
    return out


def compile_period(
    beacons: Location, catalog: Catalog, period: Period, audit_seconds: float = 120.0
) -> RollupStats:
    kind, first, last = period
    published_days = set(
        catalog.query(
            "SELECT DISTINCT day AS d FROM beacon_days WHERE day >= ? AND day <= ?",
            [first.isoformat(), last.isoformat()],
        )["d"]
    )
    days = [d.isoformat() for d in cell_days(beacons) if first <= d <= last]
    days = [d for d in days if d in published_days]
    stats = RollupStats(kind, first.isoformat(), len(days))
    weeks = _published_weeks(catalog, first) if kind == "month" else pd.DataFrame()
    cells = _with_week_labels(_period_labels(_cells(beacons, days)), weeks)
    # Variables: the cells of the common refinement of the day, week and period labels.
    # Each may be 0 (an attacker does not know a label had hits on each day); a listed
    # inner row of a day, a week or the period holds at least one hit.
    labels = ["day", "beacon", "day_target", "day_partner", "wt", "wp", "pt", "pp"]
    groups = cells.groupby(labels, sort=True, dropna=False)["hits"].sum().reset_index()
    system = DisclosureSystem()
    system.variable(("one",), 1, person=False)
    system.publish(("one",), [[("one",)]], fixed=True)
    for i, hits in enumerate(groups["hits"].tolist()):
        system.variable(("h", i), int(hits))
    groups["var"] = [("h", i) for i in range(len(groups))]
    _days_into(system, catalog, groups, days)
    any_day_campaigns: set[str] = set().union(*_campaigns(catalog, days).values())
    if kind == "month":
        _weeks_into(system, groups, weeks, any_day_campaigns)
    rows = _rows(groups, ("pt", "pp"), ())
    for key, form in rows.items():
        system.publish(("rollup", *key), [form], rank=(key[1] == TOTAL) + (key[2] == TOTAL))
        if TOTAL not in key[1:]:
            system.at_most([("one",)], form)
        elif _named(key[0], key[1], key[2], any_day_campaigns):
            system.at_least(form, MIN_VISITORS)
    same = _as_its_one_day(catalog, days, rows, system)
    try:
        result = same if same is not None else system.protect(audit_seconds)
    except DisclosureError:  # the days' own audit could not be re-proved: publish nothing
        log.warning("the %s from %s is published hidden: its audit found no pattern", *period)
        result = AuditResult(hidden={("rollup", *key) for key in rows})
    now = datetime.now(UTC)
    out = []
    for (b, t, p), form in sorted(rows.items()):
        secret = ("rollup", b, t, p) in result.hidden
        out.append(
            {
                "period": kind,
                "first_day": first,
                "last_day": last,
                "days": ",".join(days),
                "beacon": b,
                "target": t,
                "partner": p,
                "hits": None if secret else system.value(frozenset(form)),
                "suppressed": secret,
                "compiled_at": now,
            }
        )
    stats.cells = len(out)
    stats.suppressed = sum(1 for r in out if r["suppressed"])
    stats.secondary = result.secondary
    stats.audit_seconds = round(result.seconds, 3)

    def store(c: Any) -> None:
        c.execute("DELETE FROM beacon_rollups WHERE period = ? AND first_day = ?", [kind, first])
        insert_rows(c, "beacon_rollups", out)
        detail = dict(stats.__dict__)
        audit_event(
            c, actor="beacons", action="compile_rollup", subject=kind, detail=detail, at=now
        )

    catalog.write(store)
    return stats


def _as_its_one_day(
    catalog: Catalog, days: list[str], rows: dict[Any, Any], system: DisclosureSystem
) -> AuditResult | None:
    """A period with one compiled day publishes what that day's audit published, without
    an audit of its own, when each of its rows is a row of the day with the same hits:
    it then says nothing the day did not. (A week or month holding a single day is common
    at a month's edge, and its audit cost as much as the day's.) None: audit it."""
    if len(days) != 1:
        return None
    day = catalog.query(
        "SELECT beacon, target, partner, hits, suppressed FROM beacon_stats WHERE day = ?",
        [days[0]],
    )
    published = {
        (b, t, p): (h, bool(x)) for b, t, p, h, x in day.itertuples(index=False, name=None)
    }
    hidden: set[Hashable] = set()
    for key, form in rows.items():
        if key not in published:
            return None
        hits, secret = published[key]
        if secret:
            hidden.add(("rollup", *key))
        elif hits != system.value(frozenset(form)):
            return None
    return AuditResult(hidden=hidden)


def _cells(beacons: Location, days: list[str]) -> pd.DataFrame:
    frames = []
    with duckdb.connect() as con:
        for day in days:
            path = beacons.duckdb_source(con, f"{CELLS}/{day}.parquet")
            frame = con.execute("SELECT * FROM read_parquet(?)", [path]).df()
            frame["day"] = day
            frames.append(frame)
    columns = ["day", "beacon", "target", "partner", "hits", "day_target", "day_partner"]
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True)[columns].sort_values(columns[:4], ignore_index=True)


def _rows(
    cells: pd.DataFrame, labels: tuple[str, str], by: tuple[str, ...]
) -> dict[tuple[Any, ...], list[Hashable]]:
    """Each row's form (its cells' variables): inner rows and margins, keyed by
    ``(*by, beacon, target, partner)`` with ``*`` in a margin."""
    t, p = labels
    rows: dict[tuple[Any, ...], list[Hashable]] = {}
    for keys in ([*by, "beacon", t, p], [*by, "beacon", t], [*by, "beacon", p], [*by, "beacon"]):
        # One aggregation, not a Python loop over groups (~100 µs a group).
        grouped = cells.groupby(keys, sort=True)["var"].agg(list)
        for key, form in zip(grouped.index, grouped.tolist(), strict=True):
            named = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
            row = (
                *(named[k] for k in by),
                named["beacon"],
                named.get(t, TOTAL),
                named.get(p, TOTAL),
            )
            rows[row] = form
    return rows


def _period_labels(cells: pd.DataFrame) -> pd.DataFrame:
    """``pt``/``pp``: each cell's target and partner in the period (kept if a day kept it)."""
    out = cells.copy()
    for col, day_col, new in (("target", "day_target", "pt"), ("partner", "day_partner", "pp")):
        kept = set(
            map(tuple, out.loc[out[col] == out[day_col], ["beacon", col]].itertuples(index=False))
        )
        out[new] = [
            label if (b, label) in kept else OTHER
            for b, label in zip(out["beacon"], out[col], strict=True)
        ]
    return out


def _days_into(
    system: DisclosureSystem, catalog: Catalog, cells: pd.DataFrame, days: list[str]
) -> None:
    """The days' published numbers, fixed as shown or hidden."""
    if not days:
        return
    forms = _rows(cells, ("day_target", "day_partner"), ("day",))
    campaigns = _campaigns(catalog, days)
    shown = catalog.query(
        "SELECT strftime(day, '%Y-%m-%d') AS d, beacon, target, partner, suppressed"
        " FROM beacon_stats WHERE list_contains(?, strftime(day, '%Y-%m-%d'))",
        [days],
    )
    for r in shown.itertuples():
        form = forms.get((r.d, r.beacon, r.target, r.partner))
        if form:
            key = ("day", r.d, r.beacon, r.target, r.partner)
            system.publish(key, [form], fixed=not r.suppressed)
            if TOTAL not in (r.target, r.partner):  # a listed inner row had a hit
                system.at_most([("one",)], form)
            elif _named(r.beacon, r.target, r.partner, campaigns.get(str(r.d), set())):
                system.at_least(form, MIN_VISITORS)
    counters = catalog.query(
        "SELECT * FROM beacon_days WHERE list_contains(?, day)", [days]
    ).set_index("day")
    news = catalog.query(
        "SELECT n.first_seen, count(*) AS n FROM newsletter_suppression n GROUP BY 1"
    )
    for day in days:
        mine = cells[cells["day"] == day]
        day_cells = list(mine["var"])
        row: dict[str, Any] = {str(k): v for k, v in counters.loc[day].to_dict().items()}
        shown_ops = {n: row[n] for n in OPERATIONAL if not pd.isna(row[n])}
        ops = []
        for name in OPERATIONAL:
            value = shown_ops.get(name, _hidden_op(row, shown_ops, system, day_cells))
            system.variable(("op", day, name), int(value), person=False)
            system.publish(("day_op", day, name), [[("op", day, name)]], fixed=name in shown_ops)
            ops.append(("op", day, name))
        for name, form in (
            ("counted", day_cells),
            ("mpp_opens", list(mine.loc[mine["beacon"] == "email_open_mpp", "var"])),
            ("lines", day_cells + ops),
        ):
            if form:
                system.publish(("day_count", day, name), [form], fixed=not pd.isna(row[name]))
        added = int(news.loc[news["first_seen"] == row["compiled_at"], "n"].sum())
        unsub = list(mine.loc[mine["beacon"] == "unsubscribe", "var"])
        if added and unsub:
            system.variable(("newsletter", day), added, person=False)
            system.publish(("newsletter", day), [[("newsletter", day)]], fixed=True)
            system.at_most([("newsletter", day)], unsub)


def _hidden_op(
    row: dict[str, Any], shown: dict[str, Any], system: DisclosureSystem, cells: list[Hashable]
) -> int:
    """A hidden operational counter's value: its share of what ``lines`` leaves over (only
    its sum with the others enters a published number)."""
    if pd.isna(row["lines"]):
        return 0
    counted = sum(system.values[c] for c in cells)
    left = int(row["lines"]) - counted - sum(int(v) for v in shown.values())
    hidden = len(OPERATIONAL) - len(shown)
    return max(0, left // hidden) if hidden else 0


def _campaigns(catalog: Catalog, days: list[str]) -> dict[str, set[str]]:
    """Each day's sends campaigns (published in email_campaigns): kept unfolded."""
    out: dict[str, set[str]] = {}
    for r in catalog.query(
        "SELECT strftime(day, '%Y-%m-%d') AS d, campaign FROM email_campaigns"
        " WHERE list_contains(?, strftime(day, '%Y-%m-%d'))",
        [days],
    ).itertuples():
        out.setdefault(str(r.d), set()).add(str(r.campaign))
    return out


def _named(beacon: Any, target: Any, partner: Any, campaigns: set[str]) -> bool:
    """A margin row whose label the fold rule says had 11 or more visitors (on the day, or
    on some day of the period): named, not the empty partner, not a campaign."""
    if (target == TOTAL) == (partner == TOTAL):
        return False
    label = partner if target == TOTAL else target
    exempt = beacon in EMAIL and label in campaigns
    return label not in ("", OTHER) and not exempt


def _published_weeks(catalog: Catalog, month: date) -> pd.DataFrame:
    return catalog.query(
        "SELECT strftime(first_day, '%Y-%m-%d') AS f, days, beacon, target, partner, suppressed"
        " FROM beacon_rollups WHERE period = 'week' AND first_day >= ? AND first_day < ?",
        [month, (month + timedelta(days=32)).replace(day=1)],
    )


def _with_week_labels(cells: pd.DataFrame, weeks: pd.DataFrame) -> pd.DataFrame:
    """``wt``/``wp``: each cell's labels in the published week that covered its day."""
    cells["wt"], cells["wp"] = "", ""
    for _, group in weeks.groupby("f") if len(weeks) else ():
        covered = cells["day"].isin(group["days"].iloc[0].split(","))
        week = _period_labels(cells[covered].drop(columns=["pt", "pp"]))
        cells.loc[covered, "wt"] = week["pt"]
        cells.loc[covered, "wp"] = week["pp"]
    return cells


def _weeks_into(
    system: DisclosureSystem, groups: pd.DataFrame, weeks: pd.DataFrame, campaigns: set[str]
) -> None:
    """A month's published weeks, fixed, each over the days it covered."""
    for first, group in weeks.groupby("f") if len(weeks) else ():
        covered = group["days"].iloc[0].split(",")
        forms = _rows(groups[groups["day"].isin(covered)], ("wt", "wp"), ())
        for r in group.itertuples():
            form = forms.get((r.beacon, r.target, r.partner))
            if form:
                key = ("week", first, r.beacon, r.target, r.partner)
                system.publish(key, [form], fixed=not r.suppressed)
                if TOTAL not in (r.target, r.partner):
                    system.at_most([("one",)], form)
                elif _named(r.beacon, r.target, r.partner, campaigns):
                    system.at_least(form, MIN_VISITORS)


compile_rollups_task = task(
    name="compile-beacon-rollups",
    retries=2,
    retry_condition_fn=retry_transient,
    retry_delay_seconds=[1, 5],
    cache_policy=NO_CACHE,
)(compile_rollups)
