"""Attacks on the published beacon statistics: differencing across days and across
republication, and identifiers planted in every field of a hit."""

from __future__ import annotations

import random
from datetime import date, timedelta

import pytest

from dropvault.flows.beacons import compile_beacon_stats
from dropvault.storage.home import Home
from dropvault.tasks import samples
from dropvault.tasks.beacons import beacon_stats
from tests.lp_attacker import attack

pytestmark = pytest.mark.integration

DAYS = [(date(2026, 11, 1) + timedelta(days=i)).isoformat() for i in range(7)]
PLANTED = [
    "1.2.840.113619.2.55.3.604688119.868.1249",
    "MRN48151623",
    "ann.lee@example.com",
    "pk_" + "cd" * 16,
    "198.51.100.23",
]


def published(home: Home, day: str) -> dict[str, dict[tuple[str, str], int | None]]:
    tables: dict[str, dict[tuple[str, str], int | None]] = {}
    for r in beacon_stats(home.catalog, day=day).itertuples():
        tables.setdefault(r.beacon, {})[(r.target, r.partner)] = (
            None if r.suppressed else int(r.hits)
        )
    return tables


def test_no_day_and_no_range_of_days_reveals_a_small_cell(local_home: Home) -> None:
    """A week of hits. Each day is safe on its own, and no aggregate over a range of days is
    published, so summing published cells over overlapping ranges yields only sums of
    cells that are each 0 or at least 11."""
    home = local_home
    rng = random.Random(41)
    for day in DAYS:
        samples.write_hits(home.beacons, day, [samples.make_hit(rng, day, 300) for _ in range(800)])
    compile_beacon_stats(home=home)
    all_rows = beacon_stats(home.catalog)
    all_rows["day"] = all_rows["day"].dt.strftime("%Y-%m-%d")
    assert set(all_rows["day"]) == set(DAYS)  # per day only: no week or month totals
    for day in DAYS:
        for table in published(home, day).values():
            assert all(v is None or v == 0 or v > 10 for v in table.values())
    assert attack(home.catalog) == []  # nothing shown, in any table, pins a hidden number
    visible = all_rows[~all_rows["suppressed"]]
    for start in range(len(DAYS)):
        for end in range(start + 1, len(DAYS) + 1):
            window = visible[visible["day"].isin(DAYS[start:end])]
            sums = window.groupby(["beacon", "target", "partner"])["hits"].sum()
            assert ((sums == 0) | (sums > 10)).all()


def test_a_late_file_cannot_be_differenced_against_the_published_day(local_home: Home) -> None:
    """One late hit for a published day: republishing would differ by 1 and single out that
    visitor. The day stays as published; the late file is set aside and counted."""
    home = local_home
    rng = random.Random(42)
    day = DAYS[0]
    samples.write_hits(home.beacons, day, [samples.make_hit(rng, day, 200) for _ in range(1500)])
    compile_beacon_stats(home=home)
    before = beacon_stats(home.catalog, day=day)
    late = samples.make_hit(rng, day)
    late["beacon"], late["target"] = "page_view", "/"
    samples.write_hits(home.beacons, day, [late], name="late.jsonl")
    [held] = compile_beacon_stats(home=home)
    assert held.held_late == 1
    assert beacon_stats(home.catalog, day=day).equals(before)
    assert [e.name for e in home.beacons.list("late")] == [f"late/{day}/late.jsonl"]


def test_identifiers_planted_in_every_field_never_reach_the_output(local_home: Home) -> None:
    home = local_home
    day = DAYS[1]
    fields = ["beacon", "target", "partner", "visitor_id", "ip", "user_agent", "url", "referrer"]
    hits = []
    for planted in PLANTED:
        for field in fields:
            for i in range(12):  # above the small-cell limit, so only scrubbing can hide it
                hit = samples.make_hit(random.Random(i), day)
                hit["beacon"], hit["partner"] = "cobrand", "acme"
                hit["target"] = "/share"
                hit["visitor_id"] = f"v{i}"
                hit[field] = (
                    f"/share/{planted}" if field in ("target", "url", "referrer") else planted
                )
                hits.append(hit)
    samples.write_hits(home.beacons, day, hits)
    [stats] = compile_beacon_stats(home=home)
    assert stats.lines == len(hits)
    home.catalog.checkpoint()
    blobs = [home.catalog.path.read_bytes()]
    blobs += [home.exports.read_bytes(e.name) for e in home.exports.list()]
    rows = beacon_stats(home.catalog, day=day)
    text = rows.to_csv()
    for planted in PLANTED:
        assert planted not in text
        for blob in blobs:
            assert planted.encode() not in blob
