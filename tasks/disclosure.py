"""Disclosure control for every number a compile publishes: one system, audited by LP.

Every published number (a ``beacon_stats`` cell or margin, an ``email_campaigns`` open
count, a ``beacon_days`` counter, a weekly or monthly figure) is a *form*: the sum of some
underlying *variables* (the hit count of one day, beacon, target and partner; the distinct
visitors of one published row; an operational counter such as malformed lines). Forms are
grouped into *publications* (a row: its hits and unique visitors), which are shown or
hidden as a whole, and the same form published twice (``beacon_days.mpp_opens`` and the
``email_open_mpp`` grand total) is one form: hiding it hides every row that restates it.

The method is the one statistical offices use for tabular data, after τ-ARGUS
(Hundepool et al., *Statistical Disclosure Control*, Wiley 2012, §4.3-4.4; de Wolf,
"τ-ARGUS", and the audit of Fischetti and Salazar-González, "Models and algorithms for
optimizing cell suppression in tabular data with linear constraints", JASA 2000):

1. **Primary suppression.** A publication with a person-count form from 1 to 10 is hidden.
2. **Audit.** For each hidden form with a value from 1 to 10, two linear programs (HiGHS,
   through ``highspy``, one model warm-started from query to query by primal simplex, since
   only the objective changes) give the smallest and
   largest value it can take given every published form as an equality, every variable
   non-negative (a row that is listed at all has at least one hit), and the known
   inequalities between distinct counts (a row's visitors are at most its hits; a
   margin's visitors are at least each part's and at most their sum). The form is
   *protected* when that interval, rounded inwards to integers, does not lie within
   1-10: the attacker cannot tell it is a small count, nor that it is not zero.
3. **Secondary suppression.** While a form is unprotected, the published forms that bind
   its bound (non-zero dual values of the failing LP) are candidates; the cheapest
   publication holding one (inner cells before margins before day counters, then the
   smallest value) is hidden, and the form is audited again. Hiding only removes
   equalities, so a protected form stays protected: one pass over the sensitive forms,
   with newly hidden small forms queued, ends with every form protected. A point an
   earlier LP found stays feasible, so it protects any form it gives a value outside
   1-10 without a new LP.

Limits (README, "Beacon and e-mail statistics"): the audit is the integer-relaxed LP, as
τ-ARGUS's is, so an attacker solving the integer problem can in rare tables narrow an
interval further; distinct counts are bounded by inequalities only, so outside knowledge
(that no visitor used two partners, say) is not modelled; and what is published elsewhere
(an access log, a partner's own figures) is outside the system.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

import highspy
import numpy as np

SMALL_MIN, SMALL_MAX = 1, 10
EPS = 1e-6
INF = highspy.kHighsInf
BULK_ROUNDS = 8  # rounds of (maximise, minimise) the sum of the uncertified forms
BULK_MIN = 20  # fewer forms than this: one LP each is as quick
PRIMAL, DUAL = 4, 1  # HiGHS simplex_strategy values


def _first_highs_quietly() -> None:
    """highspy prints its banner to the process's stdout when the first model is made, even
    with output off, which would corrupt ``--json`` output: make that first one with
    stdout pointed at /dev/null (at import, before any thread of ours runs)."""
    sys.stdout.flush()
    saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


_first_highs_quietly()

Var = Hashable
Form = frozenset[Var]


class DisclosureError(RuntimeError):
    """No suppression can protect a form (every number that binds it is already fixed)."""


@dataclass
class AuditResult:
    hidden: set[Hashable]  # publication keys hidden
    primary: int = 0
    secondary: int = 0
    linear_programs: int = 0
    seconds: float = 0.0
    gave_up: bool = False  # over its time budget: everything it decides is hidden


@dataclass
class Publication:
    key: Hashable
    forms: tuple[Form, ...]
    rank: int  # cost class: lower is hidden first by secondary suppression
    fixed: bool | None  # None: this compile decides; True/False: already shown/hidden


@dataclass
class DisclosureSystem:
    """Variables, the forms published over them, and inequalities between variables."""

    values: dict[Var, int] = field(default_factory=dict)
    lower: dict[Var, int] = field(default_factory=dict)
    person: set[Var] = field(default_factory=set)
    publications: dict[Hashable, Publication] = field(default_factory=dict)
    inequalities: list[tuple[Form, Form]] = field(default_factory=list)  # sum(a) <= sum(b)
    floors: list[tuple[Form, int]] = field(default_factory=list)  # sum(form) >= k

    def variable(self, var: Var, value: int, *, lower: int = 0, person: bool = True) -> None:
        """A variable with its true value; ``lower`` is what an attacker knows (1 for a
        listed hit cell); ``person`` marks counts of people or their hits (sensitive)."""
        self.values[var] = int(value)
        self.lower[var] = lower
        if person:
            self.person.add(var)

    def publish(
        self,
        key: Hashable,
        forms: Iterable[Iterable[Var]],
        *,
        rank: int = 0,
        fixed: bool | None = None,
    ) -> None:
        """A publication (shown or hidden as a whole) of one or more forms."""
        made = tuple(frozenset(f) for f in forms)
        made = tuple(f for f in made if f)  # an empty sum is a structural zero
        self.publications[key] = Publication(key, made, rank, fixed)

    def at_most(self, small: Iterable[Var], big: Iterable[Var]) -> None:
        """Known to any attacker: ``sum(small) <= sum(big)``."""
        self.inequalities.append((frozenset(small), frozenset(big)))

    def at_least(self, form: Iterable[Var], k: int) -> None:
        """Known to any attacker: ``sum(form) >= k`` (a label shown had 11 visitors)."""
        self.floors.append((frozenset(form), k))

    def value(self, form: Form) -> int:
        return sum(self.values[v] for v in form)

    def sensitive(self, form: Form) -> bool:
        return bool(form & self.person) and SMALL_MIN <= self.value(form) <= SMALL_MAX

    def protect(self, budget_seconds: float | None = None) -> AuditResult:
        """Hide publications until every hidden small form is protected (see module). Past
        ``budget_seconds`` (a table built to make the audit slow), every publication this
        compile decides is hidden instead: nothing is then published to pin anything."""
        return _Auditor(self).run(budget_seconds)


class _Auditor:
    def __init__(self, system: DisclosureSystem) -> None:
        self.s = system
        self.index = {v: i for i, v in enumerate(system.values)}
        self.by_form: dict[Form, list[Hashable]] = {}
        for pub in system.publications.values():
            for form in pub.forms:
                self.by_form.setdefault(form, []).append(pub.key)
        self.hidden_forms: set[Form] = set()
        self.hidden: set[Hashable] = set()
        self.result = AuditResult(hidden=self.hidden)
        self.forms = list(self.by_form)
        self.row_of = {f: i for i, f in enumerate(self.forms)}
        self.lp = self._model()
        self.costed = np.zeros(0, dtype=np.int32)
        # Feasible points the LPs found, one per row (grown by doubling).
        self._points = np.zeros((16, len(self.index)))
        self._n_points = 0

    def run(self, budget: float | None = None) -> AuditResult:
        start = time.perf_counter()
        for pub in self.s.publications.values():
            if pub.fixed is False:
                self._hide(pub.key)
        queue: list[Form] = []
        for pub in self.s.publications.values():
            if pub.fixed is None and any(self.s.sensitive(f) for f in pub.forms):
                queue += self._hide(pub.key)
                self.result.primary += 1
        queue += [f for f in self.hidden_forms if self.s.sensitive(f) and f not in queue]
        self._certify_in_bulk(queue, start, budget)
        while queue:
            form = queue.pop()
            while True:
                if budget is not None and time.perf_counter() - start > budget:
                    self._hide_all()
                    queue.clear()
                    break
                dual = self._unprotected(form)
                if dual is None:
                    break
                queue += self._hide(self._cheapest(form, dual))
                self.result.secondary += 1
        self.result.seconds = time.perf_counter() - start
        return self.result

    def _certify_in_bulk(self, forms: list[Form], start: float, budget: float | None) -> None:
        """A few LPs that each certify many forms: maximise, then minimise, the sum of every
        form not yet certified, with each variable capped at ``max(value, 11)`` so the sum is
        bounded. A vertex optimum puts many forms at an extreme, and any feasible point
        (the caps only shrink the region) protects each form it gives a value outside 1-10.
        Stops once a round pair certifies under a tenth of what was left; the per-form LPs
        do the rest. On a day of 1 M hits with 2,489 small cells this took the audit from
        1,681 LPs and 37 s to 17 LPs and 5 s."""
        n = len(self.index)
        values = np.array([self.s.values[v] for v in self.s.values], dtype=float)
        cols = np.arange(n, dtype=np.int32)
        self.lp.changeColsBounds(n, cols, self._lower(), np.maximum(values, float(SMALL_MAX + 1)))
        # The first optimum is far from the starting basis: the dual simplex gets there
        # in a seventh of the primal's time; later ones start near it, where the primal wins.
        self.lp.setOptionValue("simplex_strategy", DUAL)
        try:
            left = [f for f in set(forms) if not self._certified(f)]
            for _ in range(BULK_ROUNDS):
                at_start = len(left)
                for maximise in (True, False):
                    if len(left) < BULK_MIN or (
                        budget is not None and time.perf_counter() - start > budget
                    ):
                        return
                    costs: dict[int, float] = {}
                    for form in left:
                        for v in form:
                            costs[self.index[v]] = costs.get(self.index[v], 0.0) + 1.0
                    self._optimise(costs, maximise)
                    self.lp.setOptionValue("simplex_strategy", PRIMAL)
                    left = [f for f in left if not self._certified(f)]
                if at_start - len(left) < at_start / 10:
                    return
        finally:
            self.lp.setOptionValue("simplex_strategy", PRIMAL)
            self.lp.changeColsBounds(n, cols, self._lower(), np.full(n, INF))

    def _lower(self) -> np.ndarray:
        return np.array([self.s.lower[v] for v in self.s.values], dtype=float)

    def _hide_all(self) -> None:
        self.result.gave_up = True
        for pub in self.s.publications.values():
            if pub.key not in self.hidden and not self._closure_fixed(pub.key):
                self._hide(pub.key)

    def _hide(self, key: Hashable) -> list[Form]:
        """Hide a publication and every publication sharing a form with it; the newly
        hidden sensitive forms are returned (they need their own audit)."""
        todo, new = [key], []
        while todo:
            k = todo.pop()
            if k in self.hidden:
                continue
            pub = self.s.publications[k]
            if pub.fixed is True:
                raise DisclosureError("a number already published restates a hidden one")
            self.hidden.add(k)
            for form in pub.forms:
                if form not in self.hidden_forms:
                    self.hidden_forms.add(form)
                    # Hidden: its equality row is freed (the model and its basis are kept).
                    self.lp.changeRowBounds(self.row_of[form], -INF, INF)
                    if self.s.sensitive(form):
                        new.append(form)
                    todo += self.by_form[form]
        return new

    def _closure_fixed(self, key: Hashable) -> bool:
        """Whether hiding ``key`` would hide a publication that is already shown."""
        seen, todo = set(), [key]
        while todo:
            k = todo.pop()
            if k in seen or k in self.hidden:
                continue
            seen.add(k)
            pub = self.s.publications[k]
            if pub.fixed is True:
                return True
            for form in pub.forms:
                todo += self.by_form[form]
        return False

    def _cheapest(self, form: Form, dual: dict[Form, float]) -> Hashable:
        binding = [f for f, d in dual.items() if abs(d) > 1e-9]
        for pool in (binding, [f for f in self._published() if f & form], self._published()):
            keys = {k for f in pool for k in self.by_form[f] if k not in self.hidden} - {
                k for k in self.hidden
            }
            keys = {k for k in keys if not self._closure_fixed(k)}
            if keys:
                return min(keys, key=self._cost)
        raise DisclosureError("no publication left to hide that protects a small count")

    def _cost(self, key: Hashable) -> tuple[int, int, str]:
        pub = self.s.publications[key]
        return (pub.rank, max((self.s.value(f) for f in pub.forms), default=0), repr(key))

    def _published(self) -> list[Form]:
        return [f for f in self.by_form if f not in self.hidden_forms]

    def _model(self) -> highspy.Highs:
        """One LP for the whole audit: a row per form (an equality while it is published,
        free once hidden) and a row per inequality; each query only changes the objective,
        so HiGHS starts from the last basis."""
        lp = highspy.Highs()
        lp.setOptionValue("output_flag", False)
        lp.setOptionValue("presolve", "off")  # keeps the basis from one query to the next
        lp.setOptionValue("simplex_strategy", PRIMAL)  # only costs change between queries
        n = len(self.index)
        lp.addVars(n, self._lower(), np.full(n, INF))
        rows: list[dict[int, float]] = [{self.index[v]: 1.0 for v in f} for f in self.forms]
        lo = [float(self.s.value(f)) for f in self.forms]
        hi = list(lo)
        for small, big in self.s.inequalities:
            row = {self.index[v]: 1.0 for v in small}
            for v in big:
                row[self.index[v]] = row.get(self.index[v], 0.0) - 1.0
            rows.append(row)
            lo.append(-INF)
            hi.append(0.0)
        for form, k in self.s.floors:
            rows.append({self.index[v]: 1.0 for v in form})
            lo.append(float(k))
            hi.append(INF)
        starts: list[int] = []
        indices: list[int] = []
        values: list[float] = []
        for row in rows:
            starts.append(len(indices))
            indices += list(row)
            values += list(row.values())
        lp.addRows(
            len(rows),
            np.array(lo),
            np.array(hi),
            len(indices),
            np.array(starts, dtype=np.int32),
            np.array(indices, dtype=np.int32),
            np.array(values, dtype=float),
        )
        return lp

    def _add_point(self, point: np.ndarray) -> None:
        if self._n_points == len(self._points):
            self._points = np.vstack([self._points, np.zeros_like(self._points)])
        self._points[self._n_points] = point
        self._n_points += 1

    def _certified(self, form: Form) -> bool:
        """Whether a point already found (feasible then, so feasible now: hiding only frees
        rows) gives ``form`` a value outside 1-10, which protects it without a new LP."""
        if not self._n_points:
            return False
        cols = [self.index[v] for v in form]
        values = self._points[: self._n_points, cols].sum(axis=1)
        return bool((values >= SMALL_MAX + 1 - EPS).any() or (values <= SMALL_MIN - 1 + EPS).any())

    def _unprotected(self, form: Form) -> dict[Form, float] | None:
        """The max LP's duals when ``form`` is pinned within 1-10, else None."""
        if self._certified(form):
            return None
        hi, dual = self._solve(form, maximise=True)
        if hi >= SMALL_MAX + 1 - EPS:
            return None
        lo, lo_dual = self._solve(form, maximise=False)
        if lo <= SMALL_MIN - 1 + EPS:
            return None
        return dual if any(abs(d) > 1e-9 for d in dual.values()) else lo_dual

    def _solve(self, form: Form, maximise: bool) -> tuple[float, dict[Form, float]]:
        return self._optimise({self.index[v]: 1.0 for v in form}, maximise)

    def _optimise(self, costs: dict[int, float], maximise: bool) -> tuple[float, dict[Form, float]]:
        lp = self.lp
        if len(self.costed):
            lp.changeColsCost(len(self.costed), self.costed, np.zeros(len(self.costed)))
        order = sorted(costs)
        self.costed = np.array(order, dtype=np.int32)
        lp.changeColsCost(len(order), self.costed, np.array([costs[i] for i in order]))
        lp.changeObjectiveSense(
            highspy.ObjSense.kMaximize if maximise else highspy.ObjSense.kMinimize
        )
        self.result.linear_programs += 1
        lp.run()
        status = lp.getModelStatus()
        if status in (
            highspy.HighsModelStatus.kUnbounded,
            highspy.HighsModelStatus.kUnboundedOrInfeasible,
        ):  # nothing published limits it (the true values are always feasible)
            return (np.inf if maximise else -np.inf), {}
        if status != highspy.HighsModelStatus.kOptimal:
            raise DisclosureError(f"the audit's linear program failed: {status}")
        value = float(lp.getInfo().objective_function_value)
        self._add_point(np.array(lp.getSolution().col_value))
        # Only the published rows that bind (few), found without a pass over every form.
        duals = np.asarray(lp.getSolution().row_dual)[: len(self.forms)]
        binding = {
            self.forms[i]: float(duals[i])
            for i in np.flatnonzero(np.abs(duals) > 1e-9)
            if self.forms[i] not in self.hidden_forms
        }
        return value, binding
