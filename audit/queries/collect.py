"""The synthetic half of an audit's queries: after the rows are answered, run each chosen strategy through its
store and hand the students their tensors (`audit.querying` calls `collect_queries`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from audit.queries import QUERIES, QUERY_SEED, QueryContext
from audit.queries.families import capped_epochs
from audit.queries.store import collect_strategy
from audit.queries.students import query_tensors


def store_fingerprint(rows_fingerprint: dict, name: str, rounds: int) -> dict:
    """What a strategy's queries depend on: the rows they are drawn from (the rows cache's identity), the
    strategy, its recipe, the rounds and the seed."""
    spec = QUERIES.get(name)
    return {**rows_fingerprint, "strategy": name, "recipe": dict(spec.recipe), "rounds": int(rounds),
            "seed": QUERY_SEED}


def collect_queries(strategies: list[str], rounds: int, splits, answers: np.ndarray, train_idx, oracle, out: Path,
                    rows_fingerprint: dict, query_batch: int, floor: float | None, label_only: bool,
                    progress: bool = True) -> tuple[dict, dict]:
    """({strategy: student tensors}, {strategy: report entry with its query counts and recipe}) for every
    synthetic strategy; only the training rows (never validation or test) are mixed or bisected."""
    idx = np.asarray(train_idx)
    ctx = QueryContext(x=splits.train_x.numpy()[idx], y=splits.train_y.numpy()[idx], answers=answers[idx],
                       num_classes=splits.num_classes, rounds=rounds, seed=QUERY_SEED)
    tensors, entries = {}, {}
    for name in strategies:
        spec = QUERIES.get(name)
        if spec.synthesise is None:
            continue
        fp = store_fingerprint(rows_fingerprint, name, rounds)
        synthetic, stats = collect_strategy(spec, ctx, oracle, out, fp, query_batch, progress)
        tensors[name] = query_tensors(synthetic, splits.normalise, floor, label_only)
        entries[name] = {**stats, "recipe": fp["recipe"], "rounds": rounds, "seed": QUERY_SEED,
                         "adaptive": spec.adaptive, "summary": spec.summary, "reference": spec.reference,
                         "fingerprint": fp}
    return tensors, entries


def apply_to_plan(plan, entries: dict, epochs: int, train_rows: int) -> None:
    """Key each strategy's students by its queries' fingerprint and cap their epochs (`capped_epochs`)."""
    for name, e in entries.items():
        e["epochs"] = capped_epochs(epochs, train_rows, e["queries"])
        e["rows_per_epoch"] = train_rows + e["queries"]
        plan.query_identity[name] = {**e["fingerprint"], "epochs": e["epochs"]}
        plan.query_train[name] = {"epochs": e["epochs"]}
