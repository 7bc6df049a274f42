"""The audit's decision rule (audit.stats.decide, docs/design.md §3): simulated error rates and the edge cases."""
from __future__ import annotations

import gc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import t as t_dist
from statsmodels.stats.multitest import multipletests

from audit.stats import DISTILLABLE, INCONCLUSIVE, UNDISTILLABLE, decide

TRIALS = 400


@pytest.fixture(autouse=True)
def _no_full_collections(monkeypatch):
    # statsmodels' Holm step calls gc.collect() on every call; 1,200 decisions would spend a minute in it.
    monkeypatch.setattr(gc, "collect", lambda *a, **k: 0)


def simulate(means: list[float], sd: float, seeds: int = 5, seed_sd: float = 0.25, seed: int = 0) -> dict[str, float]:
    """Outcome frequencies over TRIALS audits whose attack families have true mean Δ `means` (points), per-seed noise
    `sd` and a seed effect shared by every family (the same student initialisation and batches)."""
    rng = np.random.default_rng(seed)
    counts = {DISTILLABLE: 0, UNDISTILLABLE: 0, INCONCLUSIVE: 0}
    for _ in range(TRIALS):
        shared = rng.normal(0, seed_sd, seeds)
        deltas = {f"a{i}": m + shared + rng.normal(0, sd, seeds) for i, m in enumerate(means)}
        counts[decide(deltas).outcome] += 1
    return {k: v / TRIALS for k, v in counts.items()}


def test_twelve_families_with_no_gain_are_rarely_called_distillable():
    rates = simulate([0.0] * 12, sd=0.5)
    assert rates[DISTILLABLE] <= 0.07  # Holm keeps the family-wise error at α = 0.05 (+ simulation error)
    assert rates[UNDISTILLABLE] == 0.0  # true gain 0 with sd 0.5 over 5 seeds cannot be bounded by +0.3


def test_one_family_with_a_real_gain_is_found():
    assert simulate([2.0] + [0.0] * 11, sd=0.5)[DISTILLABLE] >= 0.80


def test_families_below_the_reference_are_called_undistillable():
    assert simulate([-1.0] * 12, sd=0.3)[UNDISTILLABLE] >= 0.80


def test_per_family_numbers_are_the_textbook_ones():
    deltas = {"kd": [0.9, 0.4, 0.7, 1.1, 0.2], "vid": [-0.3, 0.1, -0.6, 0.0, -0.2], "dkd": [0.2, -0.1, 0.4, 0.0, 0.3]}
    d = decide(deltas, margin=0.3, alpha=0.05)
    raw = []
    for name, xs in deltas.items():
        x = np.array(xs)
        f = d.families[name]
        se = x.std(ddof=1) / np.sqrt(len(x))
        assert f.mean == pytest.approx(x.mean()) and f.std == pytest.approx(x.std(ddof=1))
        assert f.p_value == pytest.approx(t_dist.sf(x.mean() / se, len(x) - 1))
        assert f.upper == pytest.approx(x.mean() + t_dist.ppf(0.95, len(x) - 1) * se)
        raw.append(f.p_value)
    holm = multipletests(raw, alpha=0.05, method="holm")[1]
    assert [d.families[n].p_holm for n in deltas] == pytest.approx(list(holm))
    assert d.outcome == DISTILLABLE and d.families["kd"].distillable and d["outcome"] == DISTILLABLE
    assert d.strongest == "kd" and d.to_dict()["families"]["kd"]["upper"] == pytest.approx(d.families["kd"].upper)


def test_one_seed_zero_spread_and_no_input_have_clear_answers():
    one = decide({"kd": [1.5], "vid": [-2.0]})
    assert one.outcome == INCONCLUSIVE and "at least 3" in one.reason
    assert one.families["kd"].p_value is None and one.families["kd"].upper is None
    exact = decide({"hard-label": [0.0, 0.0, 0.0]})  # e.g. a student identical to the reference
    assert exact.outcome == UNDISTILLABLE and exact.families["hard-label"].upper == 0.0
    assert decide({"kd": [0.5, 0.5, 0.5]}).outcome == DISTILLABLE
    empty = decide({})
    assert empty.outcome == INCONCLUSIVE and empty.families == {} and "no attack family" in empty.reason
    with pytest.raises(ValueError):
        decide({"kd": [0.1, 0.2]}, alpha=1.5)


def test_inconclusive_says_how_many_seeds_would_decide():
    # mean +0.1, sd 0.6 over 3 seeds: neither above 0 nor within +0.3 yet
    d = decide({"kd": [0.7, -0.5, 0.1]}, margin=0.3)
    assert d.outcome == INCONCLUSIVE
    need = d.seeds_to_decide
    assert need is not None and need > 3
    # Those many seeds with the same mean and spread do decide it, one fewer does not.
    f = d.families["kd"]

    def same_spread(n: int) -> list[float]:
        z = np.resize([1.0, -1.0], n) + (np.linspace(-1e-3, 1e-3, n) if n % 2 else 0)
        z = (z - z.mean()) / z.std(ddof=1)
        return list(f.mean + f.std * z)

    assert decide({"kd": same_spread(need)}, margin=0.3).outcome != INCONCLUSIVE
    assert decide({"kd": same_spread(need - 1)}, margin=0.3).outcome == INCONCLUSIVE


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(["kd", "dkd", "vid", "hard-label", "logit-std"]),
                       st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=8), max_size=5))
def test_the_outcome_always_follows_the_rule(deltas):
    d = decide(deltas, margin=0.3, alpha=0.05)
    fams = d.families.values()
    if any(f.distillable for f in fams):
        assert d.outcome == DISTILLABLE
    elif fams and all(f.within_margin for f in fams):
        assert d.outcome == UNDISTILLABLE
    else:
        assert d.outcome == INCONCLUSIVE
    for f in fams:
        assert not f.distillable or (f.p_holm is not None and f.p_holm < 0.05)
        assert not f.within_margin or f.upper <= 0.3
