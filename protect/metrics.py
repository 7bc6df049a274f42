"""What `protect eval` reports about a classifier's logits on a labelled split."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from protect.cmi import cmi_spectrum, normalised_cmi, separation
from protect.defaults import EVAL_TEMPERATURES

# The one range every temperature fit searches (calibrated-kd, CMIM's calibrated term, the benchmarks): CMIM
# teachers measured NLL-optimal τ of 0.14–0.20, below the former lower bound 0.25.
TAU_BOUNDS = (0.02, 50.0)


def expected_calibration_error(logits: Tensor, labels: Tensor, bins: int = 15) -> float:
    probs = torch.softmax(logits.float(), 1)
    conf, pred = probs.max(1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            ece += mask.float().mean() * (conf[mask].mean() - correct[mask].mean()).abs()
    return float(ece)


@torch.no_grad()
def fit_temperature(logp: Tensor, labels: Tensor, lo: float = TAU_BOUNDS[0], hi: float = TAU_BOUNDS[1]) -> float:
    """argmin_τ NLL(softmax(logp/τ), labels) over [lo, hi] (default `TAU_BOUNDS`): a log-spaced grid, then
    golden-section search around its best."""
    logp = logp.double()

    def nll(log_tau: float) -> float:
        return float(F.cross_entropy(logp / math.exp(log_tau), labels))

    grid = torch.linspace(math.log(lo), math.log(hi), 81).tolist()
    values = [nll(g) for g in grid]
    i = min(range(len(grid)), key=values.__getitem__)
    a, b = grid[max(0, i - 1)], grid[min(len(grid) - 1, i + 1)]
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    for _ in range(60):
        if nll(c) < nll(d):
            b = d
        else:
            a = c
        c, d = b - ratio * (b - a), a + ratio * (b - a)
    return math.exp((a + b) / 2)


def at_tau_bound(tau: float, bounds: tuple[float, float] = TAU_BOUNDS, rel: float = 1e-3) -> str | None:
    """'lower' or 'upper' when a fitted τ sits on a bound of its search (the fit was clamped), else None."""
    if tau <= bounds[0] * (1 + rel):
        return "lower"
    if tau >= bounds[1] * (1 - rel):
        return "upper"
    return None


def classifier_report(logits: Tensor, labels: Tensor, num_classes: int,
                      temperatures: Sequence[float] = EVAL_TEMPERATURES) -> dict:
    """accuracy, CMI per temperature, separation Γ and NCMI at T=1, ECE."""
    logits = logits.double()  # double keeps torch and ONNX runs equal to float tolerance
    return {
        "accuracy": float((logits.argmax(1) == labels).double().mean()),
        "cmi": {f"{t:g}": v for t, v in cmi_spectrum(logits, labels, temperatures, num_classes).items()},
        "separation": separation(logits, labels, 1.0, num_classes),
        "ncmi": normalised_cmi(logits, labels, 1.0, num_classes),
        "ece": expected_calibration_error(logits, labels),
        "rows": int(len(labels)),
    }
