"""What a beacon compile publishes, built as one disclosure system (promise P7).

Every number of a day's ``beacon_stats`` rows (hits and unique visitors, cells and
margins), its ``email_campaigns`` rows (opens, opens with MPP, and the rates that restate
them) and its ``beacon_days`` counters is a form over the same variables, audited
together by :mod:`dropvault.tasks.disclosure`:

- ``h`` variables: the hits of each listed (beacon, target, partner) cell, at least 1;
- ``u`` variables: the distinct visitors of each published row (a cell or a margin), tied
  to hits and to the other rows' visitors by inequalities only (distinct counts do not add);
- ``op`` variables: malformed, rejected and bot lines, which are not people but enter
  ``beacon_days.lines`` beside the counted hits;
- the count of ``newsletter_suppression`` keys a compile adds, which the mailer needs and
  any reader of the catalog can count (by ``first_seen``): always shown, and at most the
  unsubscribing visitors. The audit takes it as the day's keys, new or not (an attacker
  sees no more than that), so a recompile is audited as the first compile was.

``opens_with_mpp`` is ``opens`` plus the campaign's distinct MPP-proxy visitors (each
counted within its own beacon), so it is a sum of published forms and not a new distinct
count that could be subtracted from. ``scrubbed`` and ``third_party`` are not sums of
cells, so they are not published (``beacon_days`` holds NULL; the compile's caller and log
get them).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import pandas as pd

from dropvault.tasks.disclosure import AuditResult, DisclosureSystem

TOTAL, OTHER = "*", "{other}"
MIN_VISITORS = 11  # a label named in a published row had at least this many visitors
EMAIL = ("email_open", "email_open_mpp")
# beacon_days counters under the audit (beside them: files, cells, suppressed, which
# restate only how many rows there are).
DAY_COUNTERS = ("lines", "malformed", "rejected", "bots", "mpp_opens", "counted", "unsubscribes")
OPERATIONAL = ("malformed", "rejected", "bots")


@dataclass
class DayTables:
    stats: list[dict[str, Any]] = field(default_factory=list)  # beacon_stats rows
    campaigns: list[dict[str, Any]] = field(default_factory=list)  # email_campaigns rows
    counters: dict[str, int | None] = field(default_factory=dict)  # beacon_days, published
    audit: AuditResult | None = None


Row = tuple[str, str, str]  # beacon, target, partner ('*' in a margin)


def day_tables(
    day: str,
    agg: pd.DataFrame,
    sends: dict[str, int],
    counters: dict[str, int],
    newsletter_keys: int,
    budget_seconds: float | None = None,
) -> DayTables:
    """The day's published rows: ``agg`` holds every row's hits and unique visitors
    (``beacon, target, partner, hits, unique_visitors``, margins with ``*``); ``sends`` the
    campaigns' sends; ``counters`` the true day counters; ``newsletter_keys`` the day's
    unsubscribe keys."""
    # Sorted: the same day gives the same system, and the same suppression, every time.
    rows: dict[Row, tuple[int, int]] = {
        (str(b), str(t), str(p)): (int(h), int(u))
        for b, t, p, h, u in sorted(
            zip(
                agg["beacon"],
                agg["target"],
                agg["partner"],
                agg["hits"],
                agg["unique_visitors"],
                strict=True,
            )
        )
    }
    system, hits_of = _system(rows)
    _floors_into(system, hits_of, sends)
    _campaigns_into(system, rows, sends)
    _counters_into(system, rows, counters, newsletter_keys)
    result = system.protect(budget_seconds)
    hidden = result.hidden
    day_value = date.fromisoformat(day)
    out = DayTables(audit=result)
    for (b, t, p), (h, u) in rows.items():
        secret = ("beacon_stats", b, t, p) in hidden
        out.stats.append(
            {
                "day": day_value,
                "beacon": b,
                "target": t,
                "partner": p,
                "hits": None if secret else h,
                "unique_visitors": None if secret else u,
                "suppressed": secret,
            }
        )
    for campaign, sent in sorted(sends.items()):
        opens = rows.get(("email_open", campaign, TOTAL), (0, 0))[1]
        with_mpp = opens + rows.get(("email_open_mpp", campaign, TOTAL), (0, 0))[1]
        secret = ("email_campaigns", campaign) in hidden
        out.campaigns.append(
            {
                "day": day_value,
                "campaign": campaign,
                "sends": None if secret else sent,
                "opens": None if secret else opens,
                "opens_with_mpp": None if secret else with_mpp,
                "open_rate": None if secret or not sent else round(opens / sent, 4),
                "open_rate_with_mpp": None if secret or not sent else round(with_mpp / sent, 4),
                "suppressed": secret,
            }
        )
    for name in DAY_COUNTERS:
        out.counters[name] = None if ("beacon_days", name) in hidden else counters[name]
    return out


def _system(
    rows: dict[Row, tuple[int, int]],
) -> tuple[DisclosureSystem, dict[Row, list[Hashable]]]:
    system = DisclosureSystem()
    # parts[(beacon, axis, other label)]: the rows that add up along axis (1 target,
    # 2 partner) to the margin with '*' there and that other label.
    parts: dict[tuple[str, int, str], list[Row]] = defaultdict(list)
    for row, (h, u) in rows.items():
        if TOTAL not in row[1:]:
            system.variable(("h", *row), h, lower=1)
        system.variable(("u", *row), u)
        for axis in (1, 2):
            if row[axis] != TOTAL:
                parts[(row[0], axis, row[3 - axis])].append(row)
    hits_of: dict[Row, list[Hashable]] = {}
    for row in sorted(rows, key=lambda r: (r[1] == TOTAL) + (r[2] == TOTAL)):
        if TOTAL not in row[1:]:
            hits_of[row] = [("h", *row)]
        else:  # a margin's hits: its parts' along one axis (the target axis when both)
            axis = 1 if row[1] == TOTAL else 2
            part_rows = parts[(row[0], axis, row[3 - axis])]
            hits_of[row] = [v for r in part_rows for v in hits_of[r]]
    for row in rows:
        stars = (row[1] == TOTAL) + (row[2] == TOTAL)
        system.publish(("beacon_stats", *row), [hits_of[row], [("u", *row)]], rank=stars)
        system.at_most([("u", *row)], hits_of[row])
        # A margin's visitors are at least each part's and at most their sum.
        for axis in (1, 2):
            part_rows = parts[(row[0], axis, row[3 - axis])] if row[axis] == TOTAL else []
            if part_rows:
                system.at_most([("u", *row)], [("u", *r) for r in part_rows])
                for r in part_rows:
                    system.at_most([("u", *r)], [("u", *row)])
    return system, hits_of


def _floors_into(
    system: DisclosureSystem, hits_of: dict[Row, list[Hashable]], sends: dict[str, int]
) -> None:
    """What the fold rule tells any reader: a label still named (not ``{other}``, not the
    empty partner, not a sends campaign of an e-mail beacon) had 11 or more distinct
    visitors, so its margin row has at least 11 visitors and 11 hits."""
    for row in hits_of:
        b, t, p = row
        if (t == TOTAL) == (p == TOTAL):
            continue
        label = p if t == TOTAL else t
        exempt = b in EMAIL and label in sends
        if label not in ("", OTHER) and not exempt:
            system.at_least([("u", *row)], MIN_VISITORS)
            system.at_least(hits_of[row], MIN_VISITORS)


def _campaigns_into(
    system: DisclosureSystem, rows: dict[Row, tuple[int, int]], sends: dict[str, int]
) -> None:
    """A campaign's row: its opens, opens with MPP, and its sends (a count of people, from
    the sends file), which bound the opens for any reader."""
    for campaign, sent in sends.items():
        opens = [("u", *r) for r in [("email_open", campaign, TOTAL)] if r in rows]
        mpp = [("u", *r) for r in [("email_open_mpp", campaign, TOTAL)] if r in rows]
        system.variable(("sends", campaign), sent)
        system.publish(
            ("email_campaigns", campaign), [opens, opens + mpp, [("sends", campaign)]], rank=1
        )
        for part in (opens, mpp):
            if part and system.value(frozenset(part)) <= sent:  # a sends file can be wrong
                system.at_most(part, [("sends", campaign)])


def _counters_into(
    system: DisclosureSystem,
    rows: dict[Row, tuple[int, int]],
    counters: dict[str, int],
    newsletter_keys: int,
) -> None:
    cells: list[Hashable] = [("h", *r) for r in rows if TOTAL not in r[1:]]
    for name in OPERATIONAL:
        system.variable(("op", name), counters[name], person=False)
        # beacon_rejects lists every malformed line: that count is public however it is shown.
        fixed = True if name == "malformed" else None
        system.publish(("beacon_days", name), [[("op", name)]], rank=3, fixed=fixed)
    forms: dict[str, list[Hashable]] = {
        "counted": cells,
        "lines": cells + [("op", n) for n in OPERATIONAL],
        "mpp_opens": [("h", *r) for r in rows if r[0] == "email_open_mpp" and TOTAL not in r[1:]],
        "unsubscribes": [("u", *r) for r in [("unsubscribe", TOTAL, TOTAL)] if r in rows],
    }
    for name, form in forms.items():
        system.publish(("beacon_days", name), [form], rank=3)
    # newsletter_suppression gains one row per new unsubscriber, visible to any reader.
    system.variable(("newsletter",), newsletter_keys, person=False)
    system.publish(("newsletter_suppression",), [[("newsletter",)]], fixed=True)
    system.at_most([("newsletter",)], forms["unsubscribes"])
