"""`logit-mse`: regress the student's logits on the teacher's centred log-probabilities, plus CE on labels.

Centred log-probabilities equal the teacher's centred logits wherever nothing was clamped (docs/design.md §3).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from audit.attacks.base import Attack, centred


class LogitMSE(Attack):
    def __init__(self, weight: float = 1.0, ce_weight: float = 1.0):
        super().__init__(weight=weight, ce_weight=ce_weight)
        self.weight, self.ce_weight = float(weight), float(ce_weight)

    def forward_train(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        logits = model(batch["x"])
        target = centred(batch["teacher_logp"].float())
        mse = F.mse_loss(logits.float(), target)
        return logits, {"mse": self.weight * mse, "ce": self.ce_weight * F.cross_entropy(logits.float(), batch["y"])}
