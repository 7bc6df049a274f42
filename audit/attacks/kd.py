"""`kd`: Hinton et al. — α·T²·KL(p_t^T ‖ p_s^T) + (1 − α)·CE(z_s, y), over a grid of T and α."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from audit.attacks.base import Attack, kd_term

FULL_GRID = {"temperature": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0], "alpha": [0.5, 0.9]}
QUICK_GRID = {"temperature": [2.0, 4.0], "alpha": [0.5, 0.9]}


class KD(Attack):
    def __init__(self, temperature: float = 4.0, alpha: float = 0.9):
        if temperature <= 0 or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"kd needs T > 0 and α in [0, 1], got T={temperature}, α={alpha}")
        super().__init__(temperature=temperature, alpha=alpha)
        self.temperature, self.alpha = float(temperature), float(alpha)

    def forward_train(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        logits = model(batch["x"])
        kd = kd_term(logits, batch["teacher_logp"], self.temperature)
        ce = F.cross_entropy(logits.float(), batch["y"])
        return logits, {"kd": self.alpha * kd, "ce": (1.0 - self.alpha) * ce}


def variant_name(temperature: float, alpha: float) -> str:
    return f"kd-T{temperature:g}-a{alpha:g}"
