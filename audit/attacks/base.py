"""What every attack shares: the Objective shape (mdistiller style), the context it is built from, and KD maths.

An attack is a `protect.objectives.base.Objective`: `forward_train(model, batch)` returns the student's logits
and a dict of named scalar losses that protect's trainer sums. Batches carry `teacher_logp` (B, C): the
oracle's answers turned into log-probabilities (with a floor), so `softmax(teacher_logp / T)` is the
teacher's tempered output `softmax(z / T)` (docs/design.md §3).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import Tensor, nn

from protect.objectives.base import Objective


@dataclass
class AttackContext:
    """What a factory may use to build an attack: task sizes, the student's feature sizes, the transfer set."""

    num_classes: int
    feature_dims: dict[str, int] = field(default_factory=dict)
    teacher_logp: Tensor | None = None  # (N, C) recovered log-probabilities of the rows students train on
    labels: Tensor | None = None  # (N,) their true labels
    seed: int = 0
    val_logp: Tensor | None = None  # the validation slice's answers, where attacks fit their own knobs
    val_labels: Tensor | None = None


def features(model: nn.Module, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The student's `forward_features` (unwrapping DistributedDataParallel's `.module` if present)."""
    inner = getattr(model, "module", model)
    if not hasattr(inner, "forward_features"):
        raise TypeError(f"{type(inner).__name__} has no forward_features(x); feature-based attacks need it")
    return inner.forward_features(x)


def kd_term(student_logits: Tensor, teacher_logp: Tensor, temperature: float) -> Tensor:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)), averaged over the batch (Hinton et al.)."""
    t = temperature
    log_ps = F.log_softmax(student_logits.float() / t, dim=1)
    log_pt = F.log_softmax(teacher_logp.float() / t, dim=1)
    return F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean") * (t * t)


def centred(logp: Tensor) -> Tensor:
    """Log-probabilities minus their row mean: the teacher's logits up to nothing (z − mean z) when unclamped."""
    return logp - logp.mean(dim=1, keepdim=True)


class Attack(Objective):
    """Base class of the battery's objectives. `needs_soft`: the attack uses more than the teacher's label."""

    needs_soft: bool = True

    def __init__(self, **options):
        super().__init__()
        self._options = dict(options)

    def options(self) -> dict:
        return dict(self._options)


def teacher_labels(batch: dict[str, Tensor]) -> Tensor:
    return batch["teacher_logp"].argmax(dim=1)


__all__ = ["Attack", "AttackContext", "centred", "features", "kd_term", "teacher_labels"]
