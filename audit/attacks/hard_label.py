"""`hard-label`: cross-entropy on the teacher's argmax (works against a label-only endpoint)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from audit.attacks.base import Attack, teacher_labels


class HardLabel(Attack):
    needs_soft = False

    def forward_train(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        logits = model(batch["x"])
        return logits, {"ce_teacher": F.cross_entropy(logits.float(), teacher_labels(batch))}
