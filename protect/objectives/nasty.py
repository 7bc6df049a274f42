"""Nasty Teacher (Ma et al., ICLR 2021): CE − ω·τ²·KL(softmax(z/τ) ‖ softmax(z_ref/τ)), a defence to compare."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protect.objectives.base import Objective


class NastyTeacher(Objective):
    def __init__(self, reference: nn.Module, tau: float = 4.0, omega: float = 0.04):
        super().__init__()
        self.reference = reference.eval()
        for p in self.reference.parameters():
            p.requires_grad_(False)
        self.tau, self.omega = tau, omega

    def train(self, mode: bool = True) -> NastyTeacher:
        super().train(mode)
        self.reference.eval()  # the reference stays frozen, BatchNorm included
        return self

    def forward_train(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        logits = model(batch["x"])
        with torch.no_grad():
            ref = self.reference(batch["x"]).float()
        t = self.tau
        kl = F.kl_div(F.log_softmax(ref / t, 1), F.log_softmax(logits.float() / t, 1), log_target=True,
                      reduction="batchmean")  # KL(student-side teacher ‖ reference)
        return logits, {"ce": F.cross_entropy(logits.float(), batch["y"]), "nasty": -self.omega * t * t * kl}

    def options(self) -> dict:
        return {"tau": self.tau, "omega": self.omega}
