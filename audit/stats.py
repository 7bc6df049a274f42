"""Paired distillation gains and the audit's decision rule (docs/design.md §3).

Δ_a = acc(knockoff_a) − acc(LS student), seed by seed. `decide` turns the Δ of every attack family into one
of three outcomes:

- **distillable** iff, for some family, the one-sided paired t-test of Δ ≤ 0 rejects at level α after Holm's
  adjustment over the families tried;
- **undistillable** iff, for every family, the one-sided (1 − α) upper confidence bound of the mean Δ is
  ≤ the practical margin (an intersection–union test: each bound at level α suffices);
- **inconclusive** otherwise, with the number of seeds the observed spread says would decide it.

Δ is in points (percentage points of test accuracy) throughout this module.
"""
from __future__ import annotations

import math
from functools import lru_cache
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

DISTILLABLE, UNDISTILLABLE, INCONCLUSIVE = "distillable", "undistillable", "inconclusive"
MAX_SEEDS_ESTIMATE = 1000  # beyond this, "more seeds" is not a useful answer


@lru_cache(maxsize=4096)
def t_quantile(p: float, dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(p, dof))


def summarise(values: Sequence[float], confidence: float = 0.95) -> dict:
    """mean, sample std, and a two-sided Student-t interval of the mean (None where one value gives no spread)."""
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


@dataclass
class FamilyTest:
    """One attack family's paired Δ (points) and its tests."""

    n: int
    mean: float | None
    std: float | None
    per_seed: list[float]
    p_value: float | None  # one-sided paired t-test of Δ ≤ 0 (None with fewer than 2 seeds)
    p_holm: float | None  # Holm-adjusted over the families tried
    upper: float | None  # one-sided (1 − α) upper confidence bound of the mean Δ
    lower: float | None  # one-sided (1 − α) lower confidence bound of the mean Δ
    distillable: bool  # the Holm-adjusted test rejects Δ ≤ 0
    within_margin: bool  # upper ≤ margin
    seeds_to_decide: int | None  # seeds (in all) at which the observed mean and spread would decide this family

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Verdict:
    """The audit's verdict and everything it rests on. `verdict["outcome"]` works as well as `verdict.outcome`."""

    outcome: str
    alpha: float
    margin: float
    seeds: int  # the largest number of paired seeds behind any family
    families: dict[str, FamilyTest] = field(default_factory=dict)
    strongest: str | None = None  # the family with the largest mean Δ
    reason: str = ""
    seeds_to_decide: int | None = None  # for an inconclusive outcome: about how many seeds in all would decide it

    def __getitem__(self, key: str):
        return getattr(self, key)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["families"] = {k: v.to_dict() for k, v in self.families.items()}
        return out


def _one_sided_p(mean: float, std: float, n: int) -> float:
    """P-value of H0: Δ ≤ 0 against Δ > 0 (scipy's one-sample t-test); zero spread is an exact answer."""
    if std == 0.0:
        return 0.0 if mean > 0 else 1.0
    from scipy.stats import t

    return float(t.sf(mean / (std / math.sqrt(n)), n - 1))


def _bound(mean: float, std: float, n: int, level: float, side: int) -> float:
    return mean + side * t_quantile(level, n - 1) * std / math.sqrt(n)


def _seeds_needed(mean: float, std: float | None, n: int, test: str, alpha: float, margin: float) -> int | None:
    """Smallest total number of seeds at which the observed mean and std would reject Δ ≤ 0 at `alpha`
    (test='reject') or bound Δ ≤ margin (test='bound'); None if it never would (within MAX_SEEDS_ESTIMATE)."""
    if std is None or test == "reject" and mean <= 0 or test == "bound" and mean >= margin:
        return None  # one seed gives no spread to extrapolate from
    if std == 0.0:
        return max(n, 2)

    def decides(m: int) -> bool:
        half = t_quantile(1 - alpha, m - 1) * std / math.sqrt(m)
        return mean - half > 0 if test == "reject" else mean + half <= margin

    lo, hi = max(n, 2), MAX_SEEDS_ESTIMATE
    if not decides(hi):
        return None
    while lo < hi:  # the half-width shrinks as seeds are added, so a bisection finds the first m that decides
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if decides(mid) else (mid + 1, hi)
    return lo


def decide(deltas: Mapping[str, Sequence[float]], margin: float = 0.3, alpha: float = 0.05) -> Verdict:
    """The three-outcome verdict of docs/design.md §3 from each attack family's paired per-seed Δ (points).

    One seed gives no spread, so no test: every family is untested and the outcome is inconclusive. A family
    whose Δ is identical on every seed (zero spread) is treated as exact: rejected iff Δ > 0, bounded by Δ.
    No family at all is inconclusive (nothing was tried).
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if margin < 0:
        raise ValueError(f"margin must be ≥ 0 points, got {margin}")
    clean = {name: [float(v) for v in values] for name, values in deltas.items()}
    if not clean:
        return Verdict(INCONCLUSIVE, alpha, margin, 0, reason="no attack family produced a result")
    k = len(clean)
    partial: dict[str, dict] = {}
    for name, xs in clean.items():
        s = summarise(xs)
        n, mean, std = s["n"], s["mean"], s["std"]
        entry = {"n": n, "mean": mean, "std": std, "per_seed": xs, "p_value": None, "upper": None, "lower": None}
        if n >= 2:
            entry["p_value"] = _one_sided_p(mean, std, n)
            entry["upper"] = mean if std == 0 else _bound(mean, std, n, 1 - alpha, +1)
            entry["lower"] = mean if std == 0 else _bound(mean, std, n, 1 - alpha, -1)
        partial[name] = entry
    from statsmodels.stats.multitest import multipletests

    names = list(partial)
    # A family too short to test still counts in the multiplicity: it was tried (p = 1, never rejects).
    pvals = [partial[n]["p_value"] if partial[n]["p_value"] is not None else 1.0 for n in names]
    reject, p_holm, _, _ = multipletests(pvals, alpha=alpha, method="holm")
    families: dict[str, FamilyTest] = {}
    for name, rej, ph in zip(names, reject, p_holm):
        e = partial[name]
        tested = e["p_value"] is not None
        within = tested and e["upper"] <= margin
        need = None
        if e["n"] >= 2 and not (rej or within):
            # Holm's first step is Bonferroni: α/k is what a lone winner must beat.
            routes = [_seeds_needed(e["mean"], e["std"], e["n"], "reject", alpha / k, margin),
                      _seeds_needed(e["mean"], e["std"], e["n"], "bound", alpha, margin)]
            need = min((r for r in routes if r is not None), default=None)
        families[name] = FamilyTest(n=e["n"], mean=e["mean"], std=e["std"], per_seed=e["per_seed"],
                                    p_value=e["p_value"], p_holm=float(ph) if tested else None, upper=e["upper"],
                                    lower=e["lower"], distillable=bool(rej) and tested, within_margin=within,
                                    seeds_to_decide=e["n"] if (rej and tested) or within else need)
    strongest = max(families, key=lambda n: families[n].mean)
    seeds = max(f.n for f in families.values())
    winners = [n for n, f in families.items() if f.distillable]
    if winners:
        best = min(winners, key=lambda n: families[n].p_holm)
        return Verdict(DISTILLABLE, alpha, margin, seeds, families, strongest,
                        reason=f"{best} beats the LS student (Holm-adjusted one-sided p = {families[best].p_holm:.3g} "
                               f"< α = {alpha:g})")
    if all(f.within_margin for f in families.values()):
        return Verdict(UNDISTILLABLE, alpha, margin, seeds, families, strongest,
                        reason=f"every family's one-sided {100 * (1 - alpha):g}% upper bound is ≤ +{margin:g} points")
    if seeds < 2:
        return Verdict(INCONCLUSIVE, alpha, margin, seeds, families, strongest,
                        reason="one seed gives no spread to test with; run at least 3 paired seeds")
    open_ = [n for n, f in families.items() if not f.within_margin]
    # Decided either when one family is rejected, or when every open family is bounded.
    reject_routes = [_seeds_needed(f.mean, f.std, f.n, "reject", alpha / k, margin) for f in families.values()]
    bound_routes = [_seeds_needed(families[n].mean, families[n].std, families[n].n, "bound", alpha, margin)
                    for n in open_]
    bound_all = None if any(r is None for r in bound_routes) else max(bound_routes, default=None)
    overall = min((r for r in [*reject_routes, bound_all] if r is not None), default=None)
    untested = [n for n in open_ if families[n].upper is None]
    worst = untested[0] if untested else max(open_, key=lambda n: families[n].upper)
    bound = "no bound: one seed" if untested else f"upper bound {families[worst].upper:+.2f}"
    return Verdict(INCONCLUSIVE, alpha, margin, seeds, families, strongest, seeds_to_decide=overall,
                    reason=f"no family is significantly above 0, but {len(open_)} of {k} (worst: {worst}, {bound}) "
                           f"cannot be bounded by +{margin:g} points")
