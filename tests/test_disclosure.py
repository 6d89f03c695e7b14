"""Disclosure control: no published number, alone or with any other, pins a hidden one.

Each check is an attacker's: :mod:`tests.lp_attacker` reads only what the catalog shows
and solves for every hidden number's interval.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dropvault.flows.beacons import compile_beacon_stats
from dropvault.storage.home import Home
from dropvault.tasks import samples
from dropvault.tasks.beacon_rollups import CELLS
from dropvault.tasks.beacons import RepublishRefused, beacon_stats, compile_day
from dropvault.tasks.disclosure import DisclosureSystem
from tests.lp_attacker import Model, attack, attack_rollups
from tests.test_beacons import DAY, hit

# The day: /t1 has one partner, so /t0·p2 = (88 - 48) - (61 - 30) = 9.
CROSS = {
    ("/t0", "p0"): 22,
    ("/t0", "p2"): 9,
    ("/t1", "p0"): 9,
    ("/t2", "p0"): 30,
    ("/t2", "p1"): 16,
    ("/t2", "p2"): 2,
}


def grid_system(cells: dict[tuple[str, str], int]) -> tuple[DisclosureSystem, dict]:
    """One table with its margins, as the compile publishes it (hits only)."""
    system = DisclosureSystem()
    for cell, v in cells.items():
        system.variable(cell, v, lower=1)
    forms: dict[tuple[str, str], list[tuple[str, str]]] = {c: [c] for c in cells}
    for t in {t for t, _ in cells}:
        forms[(t, "*")] = [c for c in cells if c[0] == t]
    for p in {p for _, p in cells}:
        forms[("*", p)] = [c for c in cells if c[1] == p]
    forms[("*", "*")] = list(cells)
    for key, form in forms.items():
        system.publish(key, [form], rank=key.count("*"))
    return system, forms


def grid_attack(cells: dict, forms: dict, hidden: set) -> list:
    """The attacker's LP over a published grid (independent of the production audit)."""
    m = Model()
    for c in cells:
        m.var(c, lower=1)
    for key, form in forms.items():
        if key in hidden:
            m.unknown.append((str(key), form))
        else:
            m.eq.append(({c: 1 for c in form}, float(sum(cells[c] for c in form))))
    return m.pinned()


def test_the_old_rule_leaked_the_cross_relation_cell() -> None:
    """What the per-relation rule published (each relation hiding none or two) pins a cell."""
    _, forms = grid_system(CROSS)
    shown = {("*", "*"), ("/t2", "*"), ("*", "p0"), ("/t2", "p0")}
    pinned = grid_attack(CROSS, forms, set(forms) - shown)
    assert ("('/t0', 'p2')", 9.0, 9.0) in [(n, round(lo), round(hi)) for n, lo, hi in pinned]


def test_cross_relation_cell_is_protected() -> None:
    system, forms = grid_system(CROSS)
    result = system.protect()
    assert grid_attack(CROSS, forms, result.hidden) == []
    assert result.secondary > 0 and ("*", "*") not in result.hidden


@settings(max_examples=120, deadline=None)
@given(
    st.dictionaries(
        st.tuples(st.sampled_from(["a", "b", "c", "d", "e"]), st.sampled_from(["x", "y", "z"])),
        st.one_of(st.integers(1, 12), st.integers(11, 80)),
        min_size=1,
        max_size=15,
    )
)
def test_random_tables_leave_no_pinned_cell(cells: dict[tuple[str, str], int]) -> None:
    system, forms = grid_system(cells)
    result = system.protect()
    assert grid_attack(cells, forms, result.hidden) == []
    for key, form in forms.items():
        if key not in result.hidden:
            assert not 1 <= sum(cells[c] for c in form) <= 10


def test_campaigns_mpp_and_day_counters_leak_nothing(home: Home) -> None:
    """The issue's leaks: a campaign's opens hidden in one table and shown in another,
    opens_with_mpp minus opens, and beacon_days.mpp_opens shown while small."""
    hits = [hit("email_open", "nl-a", f"a{i}") for i in range(30)]
    hits += [hit("email_open", "nl-a", f"m{i}", user_agent="Mozilla/5.0") for i in range(4)]
    hits += [hit("email_open", "nl-b", f"b{i}") for i in range(25)]
    hits += [hit("email_open", "nl-c", f"c{i}") for i in range(3)]
    hits += [hit("page_view", "/", f"v{i}") for i in range(40)]
    hits += [hit("unsubscribe", "nl-a", f"u{i}") for i in range(2)]
    samples.write_hits(home.beacons, DAY, hits)
    home.beacons.put_bytes(f"{DAY}/sends.csv", b"campaign,sends\nnl-a,300\nnl-b,200\nnl-c,90\n")
    [stats] = compile_beacon_stats(home=home)
    assert stats.mpp_opens == 4 and stats.unsubscribes == 2
    day = home.catalog.query("SELECT mpp_opens, unsubscribes, counted FROM beacon_days")
    assert day["mpp_opens"].isna().all() and day["unsubscribes"].isna().all()
    camps = home.catalog.query("SELECT * FROM email_campaigns ORDER BY campaign")
    assert camps.set_index("campaign").loc["nl-c", "suppressed"]
    shown = camps[~camps["suppressed"]]
    assert ((shown["opens_with_mpp"] - shown["opens"]).fillna(0).between(1, 10)).sum() == 0
    assert attack(home.catalog) == []


def test_a_rare_page_is_named_nowhere(home: Home) -> None:
    hits = [hit("page_view", "/study/ROE^RICHARD-hiv-clinic", "p1")]
    hits += [hit("page_view", "/", f"v{i}") for i in range(30)]
    hits += [hit("page_view", "/about", f"w{i}") for i in range(30)]
    samples.write_hits(home.beacons, DAY, hits)
    compile_beacon_stats(home=home)
    home.catalog.checkpoint()
    blobs = [data for _, data in home.catalog.stored_files()]
    blobs += [home.exports.read_bytes(e.name) for e in home.exports.list()]
    assert not any(b"RICHARD" in blob or b"hiv-clinic" in blob for blob in blobs)
    assert "{other}" in set(beacon_stats(home.catalog, day=DAY)["target"])


def test_no_consent_means_no_visitor_identifier(home: Home) -> None:
    hits = [hit("page_view", "/", f"v{i}", consent="false") for i in range(20)]
    hits += [hit("page_view", "/", f"w{i}", consent="true") for i in range(15)]
    hits += [hit("unsubscribe", "nl-a", f"x{i}@example.org", consent="no") for i in range(12)]
    samples.write_hits(home.beacons, DAY, hits)
    [stats] = compile_beacon_stats(home=home)
    row = beacon_stats(home.catalog, day=DAY).set_index(["beacon", "target", "partner"])
    assert row.loc[("page_view", "/", "*"), "hits"] == 35
    assert row.loc[("page_view", "/", "*"), "unique_visitors"] == 15
    assert stats.unsubscribes == 0
    assert home.catalog.query("SELECT count(*) AS n FROM newsletter_suppression")["n"][0] == 0


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.integers(0, 10**6))
def test_random_days_give_an_attacker_nothing(tmp_path: Path, seed: int) -> None:
    """Random days (small and rare cells, campaigns, MPP, unsubscribes, bad lines): the
    independent attacker finds no hidden number pinned within 1-10."""
    home = Home.init(Path(tempfile.mkdtemp(dir=tmp_path)) / "home")  # fresh per example
    rng, day = random.Random(seed), DAY
    kinds = ["page_view", "email_open", "cobrand", "unsubscribe"]
    hits = []
    for _ in range(rng.randrange(30, 400)):
        kind = rng.choice(kinds)
        target = (
            f"nl-{rng.randrange(3)}"
            if kind in ("email_open", "unsubscribe")
            else f"/p{rng.randrange(6)}"
        )
        h = hit(kind, target, f"v{rng.randrange(rng.choice([15, 60, 300]))}")
        h["ts"] = f"{day}T10:00:00Z"
        h["partner"] = f"q{rng.randrange(3)}" if kind == "cobrand" else ""
        if kind == "email_open" and rng.random() < 0.3:
            h["user_agent"] = "Mozilla/5.0"
        if rng.random() < 0.05:
            h["user_agent"] = "Googlebot/2.1"
        hits.append(h)
    samples.write_hits(home.beacons, day, hits)
    if rng.random() < 0.7:
        sends = f"campaign,sends\nnl-0,500\nnl-1,{rng.choice([4, 80])}\n"  # a small mailing too
        home.beacons.put_bytes(f"{day}/sends.csv", sends.encode())
    if rng.random() < 0.3:
        home.beacons.put_bytes(f"{day}/bad.jsonl", b"{broken\n" * rng.randrange(1, 4))
    home.catalog.migrate()
    compile_day(home.beacons, home.exports, home.catalog, home.pepper, day)
    assert attack(home.catalog) == []


def test_weeks_and_months_leak_nothing_with_their_days(local_home: Home) -> None:
    """Twelve past days of November: weeks (the month's days 1-7, 8-14, 15-21, 22-end) and
    the month are compiled from the days' cells and audited with every published day; an
    attacker reading days, weeks and month together pins nothing."""
    home, rng = local_home, random.Random(7)
    days = [f"2026-11-{d}" for d in range(19, 31)]
    for day in days:
        hits = [samples.make_hit(rng, day, 150) for _ in range(rng.randrange(150, 500))]
        samples.write_hits(home.beacons, day, hits)
    compile_beacon_stats(home=home)
    rollups = home.catalog.query("SELECT * FROM beacon_rollups")
    periods = set(zip(rollups["period"], rollups["first_day"].astype(str), strict=True))
    assert periods == {("week", "2026-11-15"), ("week", "2026-11-22"), ("month", "2026-11-01")}
    week = rollups[
        (rollups["period"] == "week") & (rollups["first_day"].astype(str) == "2026-11-22")
    ]
    assert week["days"].iloc[0].split(",") == days[3:]
    shown = rollups[~rollups["suppressed"]]
    assert not shown["hits"].between(1, 10).any()
    # From the days' cells, not from suppressed days: a week's total is its days' total.
    total = week.set_index(["beacon", "target", "partner"]).loc[("page_view", "*", "*"), "hits"]
    by_day = beacon_stats(home.catalog).set_index(["day", "beacon", "target", "partner"])
    assert total == sum(by_day.loc[(d, "page_view", "*", "*"), "hits"] for d in days[3:])
    assert attack_rollups(home.catalog) == []
    assert attack(home.catalog) == []
    assert home.beacons.list(CELLS) == []  # the month is out: its cells are deleted


def test_a_period_of_one_day_publishes_what_the_day_did_without_an_audit(
    local_home: Home,
) -> None:
    """November's last week and the month hold one compiled day: they publish that day's
    rows as the day did (hidden where it hid), so an attacker gains nothing, and no LP
    runs for them."""
    home, rng = local_home, random.Random(11)
    day = "2026-11-30"
    samples.write_hits(home.beacons, day, [samples.make_hit(rng, day, 40) for _ in range(300)])
    compile_beacon_stats(home=home)
    rollups = home.catalog.query(
        "SELECT period, beacon, target, partner, hits, suppressed FROM beacon_rollups"
    )
    assert set(rollups["period"]) == {"week", "month"}
    days = beacon_stats(home.catalog, day=day).set_index(["beacon", "target", "partner"])
    for r in rollups.itertuples(index=False):
        shown = days.loc[(r.beacon, r.target, r.partner)]
        assert r.suppressed == shown["suppressed"]
        assert r.suppressed or r.hits == shown["hits"]
    assert rollups["suppressed"].any()  # small cells abound: some are hidden
    audits = home.catalog.query("SELECT detail FROM audit_log WHERE action = 'compile_rollup'")[
        "detail"
    ]
    assert all(json.loads(d)["audit_seconds"] == 0 for d in audits)
    assert attack_rollups(home.catalog) == []
    assert attack(home.catalog) == []


def test_an_outside_reviews_breaks_hold(home: Home) -> None:
    """From an outside review: a rare label's margin is known to be at least 11 (the fold
    rule), the reject list recounts malformed lines, a small mailing's sends bound its
    opens, and a day recompiled from other logs could be subtracted from the first."""
    hits = [hit("page_view", "/", f"v{i}") for i in range(40)]
    hits += [hit("page_view", "/about", f"w{i}") for i in range(12)]
    hits += [hit("page_view", "/rare", f"r{i}") for i in range(3)]  # folded
    hits += [hit("email_open", "nl-small", f"s{i}") for i in range(2)]
    samples.write_hits(home.beacons, DAY, hits)
    home.beacons.put_bytes(f"{DAY}/bad.jsonl", b"{broken\n{broken\n")
    home.beacons.put_bytes(f"{DAY}/sends.csv", b"campaign,sends\nnl-small,3\n")
    compile_beacon_stats(home=home)
    day = home.catalog.query("SELECT malformed FROM beacon_days")
    assert day["malformed"].tolist() == [2]  # always shown: beacon_rejects lists them
    camp = home.catalog.query(
        "SELECT sends IS NULL, opens IS NULL, suppressed FROM email_campaigns"
    )
    assert camp.values.tolist() == [[True, True, True]]  # 3 recipients: hidden with opens
    assert attack(home.catalog) == []
    before = beacon_stats(home.catalog, day=DAY)
    samples.write_hits(home.beacons, DAY, [hit("page_view", "/", "late")], name="late.jsonl")
    with pytest.raises(RepublishRefused, match=DAY):
        compile_day(home.beacons, home.exports, home.catalog, home.pepper, DAY)
    assert beacon_stats(home.catalog, day=DAY).equals(before)
    assert [e.name for e in home.beacons.list(DAY)] == [f"{DAY}/late.jsonl"]


def test_an_audit_past_its_budget_hides_everything_it_decides() -> None:
    system, forms = grid_system({(f"t{i}", f"p{j}"): 1 for i in range(6) for j in range(6)})
    result = system.protect(budget_seconds=0.0)
    assert result.gave_up and result.hidden == set(forms)


def test_a_recompile_that_changes_only_counters_is_refused(home: Home) -> None:
    """Late hits that land only in hidden cells leave beacon_stats as it was; the day's
    counters would change, and two audit rows could be subtracted: refused too."""
    hits = [hit("page_view", "/a", f"a{i}") for i in range(5)]
    hits += [hit("cobrand", f"/x{i}", f"c{i}", partner=f"p{i}") for i in range(15)]
    samples.write_hits(home.beacons, DAY, hits, name="a.jsonl")
    home.catalog.migrate()
    compile_day(home.beacons, home.exports, home.catalog, home.pepper, DAY, "keep")
    counters = home.catalog.query("SELECT * FROM beacon_days")
    for e in home.beacons.list(f"processed/{DAY}"):
        home.beacons.move(e.name, home.beacons, e.name.removeprefix("processed/"))
    again = compile_day(home.beacons, home.exports, home.catalog, home.pepper, DAY, "keep")
    assert again.counted == 20  # the same logs: let through
    late = [hit("page_view", "/a", f"late{i}") for i in range(3)]
    samples.write_hits(home.beacons, DAY, late, name="late.jsonl")
    for e in home.beacons.list(f"processed/{DAY}"):
        home.beacons.move(e.name, home.beacons, e.name.removeprefix("processed/"))
    with pytest.raises(RepublishRefused):
        compile_day(home.beacons, home.exports, home.catalog, home.pepper, DAY, "keep")
    after = home.catalog.query("SELECT * FROM beacon_days")
    assert after.drop(columns="compiled_at").equals(counters.drop(columns="compiled_at"))
