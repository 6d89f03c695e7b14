"""Small-cell and complementary suppression for published count tables (promise P7).

A table is a grid of cells (row, column) -> count, published with its row
totals, column totals and grand total. Every count from 1 to 10 is suppressed.
Then, so that no suppressed value can be derived by subtraction, every linear
relation of the table (a row with its total, a column with its total, the row
totals with the grand total, the column totals with the grand total) must hide
either none or at least two of its entries: where exactly one is hidden, the
smallest published non-zero entry of that relation is hidden too, until no
relation hides exactly one.
"""

from __future__ import annotations

TOTAL = "*"
SMALL_MIN, SMALL_MAX = 1, 10

Cell = tuple[str, str]


def with_margins(cells: dict[Cell, int]) -> dict[Cell, int]:
    """The grid plus its row totals (col ``*``), column totals (row ``*``) and grand total."""
    out = dict(cells)
    for (r, c), v in cells.items():
        out[(r, TOTAL)] = out.get((r, TOTAL), 0) + v
        out[(TOTAL, c)] = out.get((TOTAL, c), 0) + v
        out[(TOTAL, TOTAL)] = out.get((TOTAL, TOTAL), 0) + v
    return out


def relations(table: dict[Cell, int]) -> list[list[Cell]]:
    """Each additive relation as the list of its entries (parts and total together)."""
    rows = {r for r, _ in table}
    cols = {c for _, c in table}
    found = []
    for r in rows:
        found.append([(r, c) for c in cols if (r, c) in table])
    for c in cols:
        found.append([(r, c) for r in rows if (r, c) in table])
    return [rel for rel in found if len(rel) > 1]


def suppress(table: dict[Cell, int], also: set[Cell] | None = None) -> set[Cell]:
    """The entries to hide in a table that already holds its margins (plus ``also``)."""
    hidden = {k for k, v in table.items() if SMALL_MIN <= v <= SMALL_MAX}
    hidden |= {k for k in (also or set()) if k in table}
    rels = relations(table)
    changed = True
    while changed:
        changed = False
        for rel in rels:
            hid = [k for k in rel if k in hidden]
            if len(hid) != 1:
                continue
            candidates = [k for k in rel if k not in hidden and table[k] > 0]
            if not candidates:
                continue
            # Prefer hiding an inner cell over a total: totals are what readers use most.
            pick = min(candidates, key=lambda k: (TOTAL in k, table[k], str(k)))
            hidden.add(pick)
            changed = True
    return hidden


def audit(table: dict[Cell, int], hidden: set[Cell]) -> list[str]:
    """Problems with a suppression pattern (empty when it is safe by the rules above)."""
    problems = [
        f"{k} = {v} published"
        for k, v in table.items()
        if k not in hidden and SMALL_MIN <= v <= SMALL_MAX
    ]
    for rel in relations(table):
        if sum(1 for k in rel if k in hidden) == 1:
            problems.append(f"one hidden entry in {rel}: derivable by subtraction")
    return problems
