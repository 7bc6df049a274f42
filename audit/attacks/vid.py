"""`vid`: Variational Information Distillation (Ahn et al., CVPR 2019).

Maximise a variational lower bound on I(t; s): with a Gaussian q(t | s) of mean μ(s) (an MLP of the
student's penultimate feature) and a learned per-dimension variance σ_d² (homoscedastic, softplus-
parameterised), minimise −log q(t | s) = Σ_d [log σ_d + (t_d − μ_d(s))² / (2σ_d²)] + const, here averaged over
dimensions and the batch. The teacher's representation t is its centred log-probabilities (the only layer an
API exposes). Plus CE on the labels. μ and σ are submodules/parameters of the objective.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from audit.attacks.base import Attack, centred, features


def gaussian_nll(mean: Tensor, target: Tensor, variance: Tensor) -> Tensor:
    """mean over batch and dimensions of 0.5·[(t − μ)²/σ² + log σ²] (−log q up to the constant ½·log 2π)."""
    return (0.5 * ((mean - target) ** 2 / variance + torch.log(variance))).mean()


class VID(Attack):
    def __init__(self, num_classes: int, feature_dims: dict[str, int], weight: float = 1.0, hidden: int = 128,
                 init_variance: float = 5.0, eps: float = 1e-5, ce_weight: float = 1.0):
        super().__init__(weight=weight, hidden=hidden, init_variance=init_variance, ce_weight=ce_weight)
        d = feature_dims["penultimate"]
        self.regressor = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))
        # softplus(raw) + eps = init_variance at the start
        self.raw_variance = nn.Parameter(torch.full((num_classes,), math.log(math.expm1(init_variance - eps))))
        self.eps, self.weight, self.ce_weight = eps, float(weight), float(ce_weight)

    def variance(self) -> Tensor:
        return F.softplus(self.raw_variance) + self.eps

    def forward_train(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        logits, feats = features(model, batch["x"])
        mean = self.regressor(feats["penultimate"].float())
        target = centred(batch["teacher_logp"].float())
        return logits, {"vid": self.weight * gaussian_nll(mean, target, self.variance()),
                        "ce": self.ce_weight * F.cross_entropy(logits.float(), batch["y"])}
