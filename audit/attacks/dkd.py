"""`dkd`: Decoupled KD (Zhao et al., CVPR 2022): α·TCKD + β·NCKD, linearly warmed up, plus CE.

TCKD: KL between the binary (target, rest) tempered distributions; NCKD: KL between the tempered
distributions over the non-target classes. Both × T². The warm-up factor is min(1, (epoch+1)/warmup_epochs)
with warmup_epochs = max(1, round(warmup · total_epochs)) (a fraction, as audits are short).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from audit.attacks.base import Attack


def dkd_parts(student_logits: Tensor, teacher_logp: Tensor, target: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(TCKD, NCKD), each batch-mean KL × T²."""
    t = temperature
    s, te = student_logits.float() / t, teacher_logp.float() / t
    gt = F.one_hot(target, s.shape[1]).bool()
    p_s, p_t = F.softmax(s, 1), F.softmax(te, 1)
    b_s = torch.stack([p_s[gt], p_s.masked_fill(gt, 0).sum(1)], 1)  # (B, 2): target, non-target
    b_t = torch.stack([p_t[gt], p_t.masked_fill(gt, 0).sum(1)], 1)
    tckd = (b_t * (torch.log(b_t.clamp_min(1e-12)) - torch.log(b_s.clamp_min(1e-12)))).sum(1).mean() * t * t
    log_q_s = F.log_softmax(s.masked_fill(gt, -1e4), 1)
    log_q_t = F.log_softmax(te.masked_fill(gt, -1e4), 1)
    q_t = log_q_t.exp()
    nckd = (q_t * (log_q_t - log_q_s)).masked_fill(gt, 0).sum(1).mean() * t * t
    return tckd, nckd


class DKD(Attack):
    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, warmup: float = 0.2,
                 ce_weight: float = 1.0):
        super().__init__(alpha=alpha, beta=beta, temperature=temperature, warmup=warmup, ce_weight=ce_weight)
        self.alpha, self.beta, self.temperature = float(alpha), float(beta), float(temperature)
        self.warmup, self.ce_weight = float(warmup), float(ce_weight)

    def warmup_factor(self) -> float:
        epochs = max(1, round(self.warmup * self.total_epochs))
        return min(1.0, (self.epoch + 1) / epochs)

    def forward_train(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        logits = model(batch["x"])
        tckd, nckd = dkd_parts(logits, batch["teacher_logp"], batch["y"], self.temperature)
        w = self.warmup_factor()
        return logits, {"tckd": w * self.alpha * tckd, "nckd": w * self.beta * nckd,
                        "ce": self.ce_weight * F.cross_entropy(logits.float(), batch["y"])}
