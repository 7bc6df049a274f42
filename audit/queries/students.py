"""What a student trained on a strategy's queries sees: the training rows followed by the synthetic inputs.

Soft families (`kd@mixup`) get the oracle's answers on both; label-only references (`ls@mixup`) and label
controls get each input's label-only target (one-hot true labels on the rows, the strategy's target on its
inputs), smoothed by `SoftLabelSmoothing`, which on a one-hot target is exactly protect's label smoothing.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from audit.attacks.base import Attack
from audit.queries.base import SyntheticSet

ROWS = "rows"


class SoftLabelSmoothing(Attack):
    """CE against (1 − ε)·q + ε/C, q = exp(batch['teacher_logp']) a label-only target (mixed or one-hot labels)."""

    needs_soft = False

    def __init__(self, num_classes: int, epsilon: float = 0.1):
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"label-smoothing epsilon must be in [0, 1), got {epsilon}")
        super().__init__(epsilon=epsilon)
        self.epsilon, self.num_classes = float(epsilon), num_classes

    def forward_train(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        logits = model(batch["x"])
        q = batch["teacher_logp"].float().exp()
        target = (1 - self.epsilon) * q / q.sum(1, keepdim=True) + self.epsilon / self.num_classes
        return logits, {"ls": -(target * F.log_softmax(logits.float(), 1)).sum(1).mean()}


def query_tensors(synthetic: SyntheticSet, normalise, floor: float | None, label_only: bool) -> dict[str, Tensor]:
    """A strategy's tensors for `StudentData.queries`: normalised inputs, CE labels, the oracle's answers and the
    label-only targets as log-probabilities (recovered like the rows')."""
    from audit.recover import recover_logp

    return {"x": normalise(torch.from_numpy(np.ascontiguousarray(synthetic.x))),
            "y": torch.from_numpy(synthetic.y),
            "teacher_logp": recover_logp(synthetic.answers, floor, label_only=True if label_only else None).logp,
            "labels_logp": recover_logp(synthetic.label_target, floor).logp}


def training_tensors(data, variant) -> dict[str, Tensor]:
    """The tensors a task trains on. On `rows` exactly what the audit always used; on a strategy, the rows and
    then its inputs, with the oracle's answers for soft families and the label-only targets otherwise."""
    from audit.attacks import REFERENCE_NAMES

    label_only = variant.control or variant.attack in REFERENCE_NAMES
    queries = getattr(variant, "queries", ROWS)
    if queries == ROWS:
        soft = data.labels_logp if variant.control else data.teacher_logp
        return {"x": data.train_x, "y": data.train_y, "teacher_logp": soft}
    q = data.queries[queries]
    rows_soft, q_soft = (data.labels_logp, q["labels_logp"]) if label_only else (data.teacher_logp, q["teacher_logp"])
    return {"x": torch.cat([data.train_x, q["x"]]), "y": torch.cat([data.train_y, q["y"]]),
            "teacher_logp": torch.cat([rows_soft, q_soft])}
