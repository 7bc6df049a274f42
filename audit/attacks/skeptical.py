"""`skeptical`: Skeptical Student (Kundu et al., NeurIPS 2021), as docs/design.md §4 sketches it.

The teacher's signal reaches the student only through an auxiliary head on an intermediate layer
(`features["mid"]`); the final head learns from the labels and by self-distillation from the (detached)
auxiliary head. The auxiliary KD starts after a delay (a fraction of the epochs), so the shared trunk first
learns from labels. The auxiliary head is a submodule: the trainer optimises it with the student.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from audit.attacks.base import Attack, features, kd_term


def auxiliary_head(feature_dims: dict[str, int], num_classes: int) -> tuple[str, nn.Module]:
    if "mid" in feature_dims:
        c = feature_dims["mid"]
        return "mid", nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))
    if "penultimate" in feature_dims:
        d = feature_dims["penultimate"]
        return "penultimate", nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, num_classes))
    raise ValueError("skeptical needs a student with feature_dims['mid'] or ['penultimate']")


class Skeptical(Attack):
    def __init__(self, num_classes: int, feature_dims: dict[str, int], temperature: float = 4.0, alpha: float = 0.9,
                 self_distill: float = 1.0, delay: float = 0.25):
        super().__init__(temperature=temperature, alpha=alpha, self_distill=self_distill, delay=delay)
        self.feature_key, self.aux = auxiliary_head(feature_dims, num_classes)
        self.temperature, self.alpha = float(temperature), float(alpha)
        self.self_distill, self.delay = float(self_distill), float(delay)

    def teacher_on(self) -> bool:
        return self.epoch >= int(self.delay * self.total_epochs)

    def forward_train(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        logits, feats = features(model, batch["x"])
        aux = self.aux(feats[self.feature_key]).float()
        y = batch["y"]
        t = self.temperature
        losses = {"ce": F.cross_entropy(logits.float(), y),
                  "self_kd": self.self_distill * kd_term(logits, aux.detach(), t)}
        if self.teacher_on():
            losses["aux_kd"] = self.alpha * kd_term(aux, batch["teacher_logp"], t)
            losses["aux_ce"] = (1.0 - self.alpha) * F.cross_entropy(aux, y)
        else:
            losses["aux_kd"] = aux.new_zeros(())
            losses["aux_ce"] = F.cross_entropy(aux, y)
        return logits, losses
