"""CMIM (minimise CMI across temperatures: undistillable) and MCMI (maximise CMI: distillation-friendly)."""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from protect.cmi import (CMIM_DEFAULT_LAMBDA, CMIM_DEFAULT_TEMPERATURES, CMIM_DEFAULT_WARMUP, CMIM_DEFAULT_WEIGHTING,
                         Aggregator, CMIMLoss, MCMILoss, Weighting)
from protect.objectives.base import Objective


class CMIObjective(Objective):
    """Wraps a CMIMLoss/MCMILoss: EMA centroids every step, optionally an exact pass per epoch."""

    def __init__(self, loss: CMIMLoss, exact_pass: bool, lam_warmup: float = 0.0):
        super().__init__()
        if not 0.0 <= lam_warmup <= 1.0:
            raise ValueError(f"lam_warmup is a fraction of the epochs in [0, 1], got {lam_warmup}")
        if exact_pass and getattr(loss, "calibrated", False):
            raise ValueError("exact centroids are computed on raw logits; they cannot be combined with calibrated CMIM")
        self.loss = loss
        self.exact_pass = exact_pass
        self.lam_warmup = lam_warmup

    def ramp(self) -> float:
        """λ's share this epoch: a linear ramp over the first `lam_warmup` of the epochs, so that the features
        form under CE before the CMI term pulls each class's outputs together."""
        warm = round(self.lam_warmup * self.total_epochs)
        return 1.0 if warm < 1 else min(1.0, (self.epoch + 1) / warm)

    def forward_train(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        logits = model(batch["x"])
        self.loss.train(self.training)
        parts = self.loss.parts(logits, batch["y"])
        ramp = self.ramp()
        if ramp < 1.0:
            parts["cmi"] = ramp * parts["cmi"]
        return logits, parts

    def begin_epoch(self, model: nn.Module, loader, device) -> None:
        if self.exact_pass and self.epoch > 0:
            self.loss.bank.exact_pass(model, loader, device)

    def options(self) -> dict:
        return {"lambda": self.loss.lam, "temperatures": self.loss.temperatures, "aggregator": self.loss.aggregator,
                "weighting": self.loss.weighting, "momentum": self.loss.bank.momentum, "exact_pass": self.exact_pass,
                "lam_warmup": self.lam_warmup, "calibrated": self.loss.calibrated}


def cmim(num_classes: int, lam: float = CMIM_DEFAULT_LAMBDA, temperatures: Sequence[float] = CMIM_DEFAULT_TEMPERATURES,
         aggregator: Aggregator = "mean", weighting: Weighting = CMIM_DEFAULT_WEIGHTING, momentum: float = 0.9,
         exact_pass: bool = False, lam_warmup: float = CMIM_DEFAULT_WARMUP, calibrated: bool = False) -> CMIObjective:
    return CMIObjective(CMIMLoss(num_classes, lam, temperatures, aggregator, weighting, momentum,
                                 calibrated=calibrated), exact_pass, lam_warmup)


def mcmi(num_classes: int, lam: float = 0.25, momentum: float = 0.9, exact_pass: bool = False) -> CMIObjective:
    return CMIObjective(MCMILoss(num_classes, lam, momentum), exact_pass)
