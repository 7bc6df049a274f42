"""`mimkd`: Mutual Information Maximisation KD (Shrivastava et al., 2021), output-only form.

A critic T(s, t) scores (student feature, teacher output) pairs; the Jensen–Shannon MI bound
Î_JSD = E_pos[−softplus(−T(s_i, t_i))] − E_neg[softplus(T(s_i, t_j))], with the batch's other rows as
negatives, is maximised jointly over the critic and the student: the loss is −Î_JSD (plus CE on labels).
The critic is separable, T(s, t) = ⟨f(s), g(t)⟩, so all B² pairs cost one matrix product; s is the student's
penultimate feature, t the teacher's centred log-probabilities. The critic is a submodule of the objective.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from audit.attacks.base import Attack, centred, features


def jsd_mi_loss(scores: Tensor) -> Tensor:
    """−Î_JSD for a (B, B) score matrix whose diagonal holds the positive pairs."""
    b = scores.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=scores.device)
    positive = F.softplus(-scores[eye]).mean()
    negative = F.softplus(scores[~eye]).mean() if b > 1 else scores.new_zeros(())
    return positive + negative


class MIMKD(Attack):
    def __init__(self, num_classes: int, feature_dims: dict[str, int], weight: float = 1.0, embed: int = 64,
                 hidden: int = 128, ce_weight: float = 1.0):
        super().__init__(weight=weight, embed=embed, hidden=hidden, ce_weight=ce_weight)
        d = feature_dims["penultimate"]
        self.student_embed = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, embed))
        self.teacher_embed = nn.Sequential(nn.Linear(num_classes, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, embed))
        self.weight, self.ce_weight = float(weight), float(ce_weight)

    def scores(self, student_feature: Tensor, teacher_logp: Tensor) -> Tensor:
        return self.student_embed(student_feature.float()) @ self.teacher_embed(centred(teacher_logp.float())).T

    def forward_train(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        logits, feats = features(model, batch["x"])
        mi = jsd_mi_loss(self.scores(feats["penultimate"], batch["teacher_logp"]))
        return logits, {"mi": self.weight * mi, "ce": self.ce_weight * F.cross_entropy(logits.float(), batch["y"])}
