"""Query strategies: what the attacker asks the oracle about, one file each, a registry `QUERIES`.

`rows` is the transfer set itself and is always part of an audit (the validation slice, the test split and the
label-only reference on rows come from it). Every other strategy synthesises extra inputs from the training rows;
the families trained on them are named `attack@strategy` (e.g. `kd@mixup`) and compared with one label-only
reference, the best on validation of `ls` and each strategy's `ls@strategy`.

Budget: `--budget B` counts every query. With m synthetic strategies at k rounds each, a synthetic strategy asks
k × n_train inputs (n_train: the transfer rows outside the validation slice), so the real rows R are the largest
number with R + m·k·n_train(R) ≤ B (`rows_for_budget`).
"""
from __future__ import annotations

from protect.registry import Registry, UnknownNameError

from audit.queries.base import QueryContext, QuerySpec, SyntheticSet
from audit.queries.boundary import BOUNDARY
from audit.queries.mixup import MIXUP
from audit.queries.rows import ROWS

QUERIES: Registry[QuerySpec] = Registry("query strategy")
for _spec in (ROWS, MIXUP, BOUNDARY):
    QUERIES.register(_spec.name)(_spec)

# `audit run`'s default. Measured (bench/results/protection-queries-fashion-mnist.md, 28,000 queries, 8 paired
# seeds): mixup held the strongest family against both the CE and the default CMIM teacher (CMIM: logit-mse +0.21 on
# rows, +0.52 on mixup inputs), at 633–801 s per family on 2 cores; boundary never held the strongest.
DEFAULT_QUERIES = "rows,mixup"
QUERY_SEED = 0  # every strategy's random choices; recorded in the cache fingerprint


def parse_queries(selection: str) -> list[str]:
    """'rows,mixup,…' → strategy names in registry order, `rows` first and always included.

    Raises UnknownNameError naming the valid strategies."""
    names = [n.strip() for n in selection.split(",") if n.strip()]
    if not names:
        raise UnknownNameError(f"--queries names no strategy; valid names: {', '.join(QUERIES.names())}")
    for n in names:
        QUERIES.get(n)
    return ["rows", *[n for n in dict.fromkeys(names) if n != "rows"]]


def train_rows(rows: int, val_fraction: float) -> int:
    """Rows outside the validation slice (as `audit.querying.validation_split` cuts them)."""
    return rows - int(round(val_fraction * rows))


def synthetic_total(strategies: list[str], rows: int, rounds: int, val_fraction: float) -> int:
    return sum(QUERIES.get(s).size(train_rows(rows, val_fraction), rounds) for s in strategies)


def rows_for_budget(budget: int | None, available: int, strategies: list[str], rounds: int,
                    val_fraction: float) -> int:
    """The real rows to query so that they and every strategy's synthetic queries fit `budget` (all available
    rows without one). With `rows` alone this is min(budget, available), as before query strategies."""
    cap = available if budget is None else min(budget, available)
    if budget is None:
        return cap
    fits = lambda r: r + synthetic_total(strategies, r, rounds, val_fraction) <= budget  # noqa: E731
    lo, hi = 0, cap  # fits() is monotone in r: bisect for the largest r that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


__all__ = ["QUERIES", "DEFAULT_QUERIES", "QUERY_SEED", "QueryContext", "QuerySpec", "SyntheticSet", "parse_queries",
           "rows_for_budget", "synthetic_total", "train_rows"]
