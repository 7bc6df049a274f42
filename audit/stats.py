"""Paired distillation gains (DESIGN §3): Δ_a = acc(knockoff_a) − acc(LS student), seed by seed."""
from __future__ import annotations

import math
from collections.abc import Sequence


def t_quantile(p: float, dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(p, dof))


def summarise(values: Sequence[float], confidence: float = 0.95) -> dict:
    """mean, sample std, and a Student-t interval of the mean (None where one value gives no spread)."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci95": None}
    mean = sum(xs) / n
    if n < 2:
        return {"n": 1, "mean": mean, "std": None, "ci95": None}
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half]}


def paired_delta(attack: Sequence[float], reference: Sequence[float]) -> dict:
    """Per-seed differences and their summary; the two lists are aligned by seed."""
    if len(attack) != len(reference):
        raise ValueError(f"paired Δ needs one value per seed on both sides, got {len(attack)} and {len(reference)}")
    per_seed = [a - r for a, r in zip(attack, reference)]
    return {"per_seed": per_seed, **summarise(per_seed)}
