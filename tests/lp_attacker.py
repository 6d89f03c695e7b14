"""An attacker with only the published tables and a linear-program solver.

Written for the tests apart from ``tasks/disclosure.py`` (it reads only what any catalog
reader sees): for every number the catalog hides, it computes the interval the number is
confined to by everything shown, and reports those pinned within 1-10.
"""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np
import pandas as pd
from scipy.optimize import linprog
from scipy.sparse import lil_matrix

from dropvault.storage.catalog import Catalog


class Model:
    def __init__(self) -> None:
        self.vars: dict[Hashable, int] = {}
        self.lower: list[float] = []
        self.eq: list[tuple[dict[Hashable, float], float]] = []
        self.ub: list[dict[Hashable, float]] = []  # expression <= 0
        self.unknown: list[tuple[str, list[Hashable]]] = []

    def floor(self, form: list[Hashable], k: float) -> None:
        """``sum(form) >= k``, through a variable fixed at 1."""
        if "one" not in self.vars:
            self.var("one", lower=1)
            self.eq.append(({"one": 1}, 1.0))
        self.ub.append({v: -1 for v in form} | {"one": k})

    def var(self, key: Hashable, lower: float = 0) -> Hashable:
        if key not in self.vars:
            self.vars[key] = len(self.vars)
            self.lower.append(lower)
        return key

    def pinned(self) -> list[tuple[str, float, float]]:
        n = len(self.vars)
        a_eq = lil_matrix((len(self.eq), n))
        for i, (expr, _) in enumerate(self.eq):
            for k, c in expr.items():
                a_eq[i, self.vars[k]] += c
        a_ub = lil_matrix((max(len(self.ub), 1), n))
        for i, expr in enumerate(self.ub):
            for k, c in expr.items():
                a_ub[i, self.vars[k]] += c
        b_eq = np.array([b for _, b in self.eq])
        found = []
        for name, form in self.unknown:
            c = np.zeros(n)
            for k in form:
                c[self.vars[k]] += 1
            ends = []
            for sign in (1, -1):
                res = linprog(
                    sign * c,
                    A_ub=a_ub.tocsr(),
                    b_ub=np.zeros(a_ub.shape[0]),
                    A_eq=a_eq.tocsr() if self.eq else None,
                    b_eq=b_eq if self.eq else None,
                    bounds=[(lo, None) for lo in self.lower],
                    method="highs",
                )
                assert res.status in (0, 3), res.message
                ends.append(np.inf if res.status == 3 else sign * res.fun)
            lo, hi = ends
            if np.ceil(lo - 1e-6) >= 1 and np.floor(hi + 1e-6) <= 10:
                found.append((name, lo, hi))
        return found


def attack(catalog: Catalog) -> list[tuple[str, float, float]]:
    """Every hidden number pinned within 1-10, as ``(name, low, high)``."""
    stats = catalog.query(
        "SELECT strftime(day, '%Y-%m-%d') AS d, beacon AS b, target AS t, partner AS p, hits,"
        " unique_visitors AS uv, suppressed FROM beacon_stats"
    )
    camps = catalog.query(
        "SELECT strftime(day, '%Y-%m-%d') AS d, campaign, opens, opens_with_mpp, suppressed"
        " FROM email_campaigns"
    )
    days = catalog.query("SELECT * FROM beacon_days")
    news = catalog.query("SELECT first_seen, count(*) AS n FROM newsletter_suppression GROUP BY 1")
    m = Model()
    _rows(m, stats, _sends_by_day(camps))
    _distinct_margins(m, stats)
    _campaigns(m, camps)
    _days(m, days, news)
    m.unknown = [(name, form) for name, form in m.unknown if form]
    return m.pinned()


def _sends_by_day(camps: pd.DataFrame) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for r in camps.itertuples():
        out.setdefault(r.d, set()).add(r.campaign)
    return out


def named(b: str, t: str, p: str, campaigns: set[str]) -> bool:
    """The fold rule, as any reader knows it: a label still named in a margin row had 11 or
    more distinct visitors (unless it is the empty partner or a sends campaign)."""
    if (t == "*") == (p == "*"):
        return False
    label = p if t == "*" else t
    exempt = b in ("email_open", "email_open_mpp") and label in campaigns
    return label not in ("", "{other}") and not exempt


def _rows(m: Model, stats: pd.DataFrame, campaigns: dict[str, set[str]]) -> None:
    """Each row's hits (a sum of listed cells, each at least 1) and visitors."""
    inner = stats[(stats.t != "*") & (stats.p != "*")]
    for r in inner.itertuples():
        m.var(("h", r.d, r.b, r.t, r.p), lower=1)
    for r in stats.itertuples():
        sel = inner[(inner.d == r.d) & (inner.b == r.b)]
        if r.t != "*":
            sel = sel[sel.t == r.t]
        if r.p != "*":
            sel = sel[sel.p == r.p]
        form: list[Hashable] = [("h", r.d, r.b, x.t, x.p) for x in sel.itertuples()]
        u = m.var(("u", r.d, r.b, r.t, r.p))
        m.ub.append({u: 1, **{h: -1 for h in form}})
        if named(r.b, r.t, r.p, campaigns.get(r.d, set())):
            m.floor([u], 11)
        if r.suppressed:
            m.unknown.append((f"{r.d} {r.b} {r.t} {r.p} hits", form))
            m.unknown.append((f"{r.d} {r.b} {r.t} {r.p} visitors", [u]))
        else:
            m.eq.append(({h: 1 for h in form}, float(r.hits)))
            m.eq.append(({u: 1}, float(r.uv)))


def _distinct_margins(m: Model, stats: pd.DataFrame) -> None:
    """A margin's visitors: at least each part's, at most their sum."""
    for r in stats.itertuples():
        u = ("u", r.d, r.b, r.t, r.p)
        for axis, other in (("t", "p"), ("p", "t")):
            if getattr(r, axis) != "*":
                continue
            parts = stats[
                (stats.d == r.d)
                & (stats.b == r.b)
                & (stats[axis] != "*")
                & (stats[other] == getattr(r, other))
            ]
            keys = [("u", x.d, x.b, x.t, x.p) for x in parts.itertuples()]
            if keys:
                m.ub.append({u: 1, **{k: -1 for k in keys}})
                m.ub += [{k: 1, u: -1} for k in keys]


def _campaigns(m: Model, camps: pd.DataFrame) -> None:
    for r in camps.itertuples():
        opens = [k for k in [("u", r.d, "email_open", r.campaign, "*")] if k in m.vars]
        mpp = [k for k in [("u", r.d, "email_open_mpp", r.campaign, "*")] if k in m.vars]
        if r.suppressed:
            m.unknown.append((f"{r.d} {r.campaign} opens", opens))
            m.unknown.append((f"{r.d} {r.campaign} opens_with_mpp", opens + mpp))
        else:
            m.eq.append(({k: 1 for k in opens}, float(r.opens)))
            m.eq.append(({k: 1 for k in opens + mpp}, float(r.opens_with_mpp)))


def _days(m: Model, days: pd.DataFrame, news: pd.DataFrame) -> None:
    """beacon_days counters, and the rows each compile added to the newsletter list."""
    for r in days.itertuples():
        d = r.day
        cells = [k for k in m.vars if k[0] == "h" and k[1] == d]  # type: ignore[index]
        ops = [m.var(("op", d, n)) for n in ("malformed", "rejected", "bots")]
        unsub = [k for k in [("u", d, "unsubscribe", "*", "*")] if k in m.vars]
        forms = {
            "counted": cells,
            "mpp_opens": [k for k in cells if k[2] == "email_open_mpp"],  # type: ignore[index]
            "unsubscribes": unsub,
            "lines": cells + ops,
            "malformed": [ops[0]],
            "rejected": [ops[1]],
            "bots": [ops[2]],
        }
        for name, form in forms.items():
            value = getattr(r, name)
            if value is not None and not pd.isna(value):
                m.eq.append(({k: 1 for k in form}, float(value)))
            elif name not in ("malformed", "rejected", "bots"):
                m.unknown.append((f"{d} beacon_days.{name}", form))
        added = news[news.first_seen == r.compiled_at]["n"].sum()
        if added and unsub:
            m.ub.append({unsub[0]: -1, m.var(("nl", d)): 1})
            m.eq.append(({("nl", d): 1}, float(added)))


def attack_rollups(catalog: Catalog) -> list[tuple[str, float, float]]:
    """Every hidden day or rollup hits count pinned within 1-10, reading each published month
    with its weeks and days. The attacker's variables: the hits of each month cell on each
    day (at least 0), which fall in the day's (and the week's) row of the same labels, or in
    its ``{other}`` row where that day (week) does not list the label."""
    stats = catalog.query(
        "SELECT strftime(day, '%Y-%m-%d') AS d, beacon AS b, target AS t, partner AS p, hits,"
        " suppressed FROM beacon_stats"
    )
    rollups = catalog.query(
        "SELECT period, strftime(first_day, '%Y-%m-%d') AS f, days, beacon AS b, target AS t,"
        " partner AS p, hits, suppressed FROM beacon_rollups"
    )
    campaigns = _sends_by_day(
        catalog.query("SELECT strftime(day, '%Y-%m-%d') AS d, campaign FROM email_campaigns")
    )
    found = []
    for month, mrows in rollups[rollups.period == "month"].groupby("f"):
        days = mrows["days"].iloc[0].split(",")
        weeks = rollups[(rollups.period == "week") & (rollups.f.str[:7] == str(month)[:7])]
        m = Model()
        grid = mrows[(mrows.t != "*") & (mrows.p != "*")]
        z = {}
        for r in grid.itertuples():
            for d in days:
                z[(d, r.b, r.t, r.p)] = m.var(("z", d, r.b, r.t, r.p))
        tables = [(stats[stats.d == d], [d], f"day {d}") for d in days]
        tables += [(g, g["days"].iloc[0].split(","), f"week {w}") for w, g in weeks.groupby("f")]
        tables.append((mrows, days, f"month {month}"))
        for rows, covered, name in tables:
            listed_t = set(zip(rows.b, rows.t, strict=True))
            listed_p = set(zip(rows.b, rows.p, strict=True))
            for r in rows.itertuples():
                form = [
                    v
                    for (d, b, t, p), v in z.items()
                    if d in covered
                    and b == r.b
                    and (r.t == "*" or (t if (b, t) in listed_t else "{other}") == r.t)
                    and (r.p == "*" or (p if (b, p) in listed_p else "{other}") == r.p)
                ]
                if r.suppressed:
                    m.unknown.append((f"{name} {r.b} {r.t} {r.p}", form))
                else:
                    m.eq.append(({v: 1 for v in form}, float(r.hits)))
                if r.t != "*" and r.p != "*" and form:  # a listed inner row had a hit
                    m.floor(form, 1)
                sends = set().union(*(campaigns.get(d, set()) for d in covered))
                if form and named(r.b, r.t, r.p, sends):
                    m.floor(form, 11)
        m.unknown = [(n, f) for n, f in m.unknown if f]
        found += m.pinned()
    return found
