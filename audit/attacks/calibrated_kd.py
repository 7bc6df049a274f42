"""`calibrated-kd`: temperature-scale the teacher's recovered logits against true labels on a held-out slice,
then KD from the calibrated teacher: α·T²·KL(softmax(ℓ/(τT)) ‖ softmax(z/T)) + (1 − α)·CE.

τ minimises the labels' negative log-likelihood under softmax(ℓ/τ) on the audit's validation slice (a fixed 10%
of the rows without one; ℓ = recovered log-probabilities, equal to the logits up to a constant), searched in
[0.25, 100]. The slice is part of the teacher's own training data when the transfer set is its training split: a teacher that is right
on every row of it drives τ to the lower bound (sharper targets), so against such a teacher calibrated-kd is
close to CE on labels; it matters against teachers whose probabilities are mis-scaled or that err on the slice. A teacher trained to be overconfident
or to hide its dark knowledge in a scale (CMIM, Nasty) is rescaled before distillation.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from audit.attacks.base import Attack, kd_term


def calibration_slice(n: int, fraction: float = 0.1, seed: int = 0) -> Tensor:
    """Indices of a fixed slice of the transfer set (the same for every student of the audit)."""
    k = max(1, int(round(fraction * n)))
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]


@torch.no_grad()
def fit_temperature(logp: Tensor, labels: Tensor, lo: float = 0.25, hi: float = 100.0) -> float:
    """argmin_τ NLL(softmax(logp/τ), labels): a log-spaced grid, then golden-section search around its best."""
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


class CalibratedKD(Attack):
    def __init__(self, calibration_temperature: float, temperature: float = 1.0, alpha: float = 0.9):
        super().__init__(calibration_temperature=round(float(calibration_temperature), 6), temperature=temperature,
                         alpha=alpha)
        self.tau, self.temperature, self.alpha = float(calibration_temperature), float(temperature), float(alpha)

    def forward_train(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        logits = model(batch["x"])
        kd = kd_term(logits, batch["teacher_logp"].float() / self.tau, self.temperature)
        ce = F.cross_entropy(logits.float(), batch["y"])
        return logits, {"kd": self.alpha * kd, "ce": (1.0 - self.alpha) * ce}
