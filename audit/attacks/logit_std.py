"""`logit-std`: KD on z-scored logits (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024).

Both sides are standardised per row, (z − mean z) / std z, before the tempered KL; the teacher's
log-probabilities standardise to exactly its standardised logits (the log-partition constant cancels).
Defaults: base temperature 2, KD weight 9, CE weight 0.1 (the paper's KD+LS settings as we read them).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from audit.attacks.base import Attack, kd_term


def standardise(z: Tensor, eps: float = 1e-7) -> Tensor:
    z = z.float()
    return (z - z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + eps)


class LogitStd(Attack):
    def __init__(self, temperature: float = 2.0, weight: float = 9.0, ce_weight: float = 0.1):
        super().__init__(temperature=temperature, weight=weight, ce_weight=ce_weight)
        self.temperature, self.weight, self.ce_weight = float(temperature), float(weight), float(ce_weight)

    def forward_train(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        logits = model(batch["x"])
        kd = kd_term(standardise(logits), standardise(batch["teacher_logp"]), self.temperature)
        return logits, {"kd_std": self.weight * kd, "ce": self.ce_weight * F.cross_entropy(logits.float(), batch["y"])}
