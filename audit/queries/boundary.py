"""`boundary`: adaptive boundary sampling. Pairs of training rows that the oracle labels differently are bisected
along their segment x(t) = (1 − t)·x_i + t·x_j: each wave asks the midpoint of every pair's current interval and
keeps the half where the oracle's label changes, so the queries close in on the decision boundary between the
two classes (the boundary search of HopSkipJump-style attacks; the regions ActiveThief's uncertainty sampling and
Papernot et al.'s Jacobian augmentation aim at). Each wave depends on the previous wave's answers.

Only the oracle's top-1 label chooses the queries, so a label-only endpoint yields the same inputs: the
label-only counterpart trains on them with the oracle's top-1 label (what such an endpoint answers), smoothed like
the LS reference. The soft families' CE term uses the same top-1 label.
"""
from __future__ import annotations

import numpy as np

from audit.queries.base import Ask, QueryContext, QuerySpec, SyntheticSet, one_hot

BISECTION_STEPS = 4  # waves per pair: the last interval is 1/16 of the segment


def pairs(labels: np.ndarray, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`count` pairs (i, j) of rows the oracle labels differently (any j if every row has the same label)."""
    n = len(labels)
    i, j = rng.integers(0, n, size=count), rng.integers(0, n, size=count)
    if len(np.unique(labels)) > 1:
        for _ in range(1000):  # redraw j where it shares i's label; a few rounds suffice with ≥ 2 classes
            same = labels[i] == labels[j]
            if not same.any():
                break
            j[same] = rng.integers(0, n, size=int(same.sum()))
    return i, j


def synthesise(ctx: QueryContext, ask: Ask) -> SyntheticSet:
    rng = np.random.default_rng([ctx.seed, 2])
    count = size(len(ctx.y), ctx.rounds) // BISECTION_STEPS
    top = ctx.answers.argmax(1)
    i, j = pairs(top, count, rng)
    lo, hi = np.zeros(count, np.float32), np.ones(count, np.float32)
    xs, answers = [], []
    for _ in range(BISECTION_STEPS):
        t = ((lo + hi) / 2).astype(np.float32)
        lt = t[:, None, None, None]
        x = ((1 - lt) * ctx.x[i] + lt * ctx.x[j]).astype(np.float32)
        a = ask(x)
        on_i_side = a.argmax(1) == top[i]
        lo, hi = np.where(on_i_side, t, lo), np.where(on_i_side, hi, t)
        xs.append(x)
        answers.append(a)
    answers_all = np.concatenate(answers)
    labels = answers_all.argmax(1).astype(np.int64)
    return SyntheticSet(np.concatenate(xs), answers_all, labels, one_hot(labels, ctx.num_classes))


def size(n_train: int, rounds: int) -> int:
    return (n_train * rounds // BISECTION_STEPS) * BISECTION_STEPS


BOUNDARY = QuerySpec("boundary", f"adaptive: bisect segments between rows the oracle labels differently, "
                     f"{BISECTION_STEPS} waves each chosen from the last answers; --query-rounds × the training rows",
                     synthesise=synthesise, size=size, recipe={"bisection_steps": BISECTION_STEPS}, adaptive=True,
                     reference="LS on the oracle's top-1 labels of the same inputs (what a label-only endpoint gives)")
