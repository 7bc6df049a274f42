"""Baseline objectives: cross-entropy and label smoothing."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from protect.objectives.base import Objective


class CrossEntropy(Objective):
    def forward_train(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        logits = model(batch["x"])
        return logits, {"ce": F.cross_entropy(logits.float(), batch["y"])}


class LabelSmoothing(Objective):
    def __init__(self, epsilon: float = 0.1):
        super().__init__()
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"label-smoothing epsilon must be in [0, 1), got {epsilon}")
        self.epsilon = epsilon

    def forward_train(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        logits = model(batch["x"])
        return logits, {"ls": F.cross_entropy(logits.float(), batch["y"], label_smoothing=self.epsilon)}

    def options(self) -> dict:
        return {"epsilon": self.epsilon}
