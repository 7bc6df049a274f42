"""`calibrated-kd`: temperature-scale the teacher's recovered logits against true labels on a held-out slice,
then KD from the calibrated teacher: α·T²·KL(softmax(ℓ/(τT)) ‖ softmax(z/T)) + (1 − α)·CE.

τ minimises the labels' negative log-likelihood under softmax(ℓ/τ) on the audit's validation slice (a fixed 10%
of the rows without one; ℓ = recovered log-probabilities, equal to the logits up to a constant), searched in
`protect.metrics.TAU_BOUNDS` = [0.02, 50] (CMIM teachers are under-confident: τ ≈ 0.14–0.20). The slice is part of the teacher's own training data when the transfer set is its training split: a teacher that is right
on every row of it drives τ to the lower bound (sharper targets), so against such a teacher calibrated-kd is
close to CE on labels; it matters against teachers whose probabilities are mis-scaled or that err on the slice. A teacher trained to be overconfident
or to hide its dark knowledge in a scale (CMIM, Nasty) is rescaled before distillation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from audit.attacks.base import Attack, kd_term
from protect.metrics import fit_temperature  # noqa: F401 (the attack's τ; re-exported for audit.attacks)


def calibration_slice(n: int, fraction: float = 0.1, seed: int = 0) -> Tensor:
    """Indices of a fixed slice of the transfer set (the same for every student of the audit)."""
    k = max(1, int(round(fraction * n)))
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]


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
