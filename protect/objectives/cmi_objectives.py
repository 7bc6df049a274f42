"""CMIM (minimise CMI across temperatures: undistillable) and MCMI (maximise CMI: distillation-friendly)."""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from protect.cmi import CMIM_DEFAULT_LAMBDA, Aggregator, CMIMLoss, MCMILoss, Weighting
from protect.objectives.base import Objective


class CMIObjective(Objective):
    """Wraps a CMIMLoss/MCMILoss: EMA centroids every step, optionally an exact pass per epoch."""

    def __init__(self, loss: CMIMLoss, exact_pass: bool):
        super().__init__()
        self.loss = loss
        self.exact_pass = exact_pass

    def forward_train(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        logits = model(batch["x"])
        self.loss.train(self.training)
        return logits, self.loss.parts(logits, batch["y"])

    def begin_epoch(self, model: nn.Module, loader, device) -> None:
        if self.exact_pass and self.epoch > 0:
            self.loss.bank.exact_pass(model, loader, device)

    def options(self) -> dict:
        return {"lambda": self.loss.lam, "temperatures": self.loss.temperatures, "aggregator": self.loss.aggregator,
                "weighting": self.loss.weighting, "momentum": self.loss.bank.momentum, "exact_pass": self.exact_pass}


def cmim(num_classes: int, lam: float = CMIM_DEFAULT_LAMBDA, temperatures: Sequence[float] = (1, 2, 4, 8, 16),
         aggregator: Aggregator = "mean", weighting: Weighting = "1", momentum: float = 0.9,
         exact_pass: bool = False) -> CMIObjective:
    return CMIObjective(CMIMLoss(num_classes, lam, temperatures, aggregator, weighting, momentum), exact_pass)


def mcmi(num_classes: int, lam: float = 0.25, momentum: float = 0.9, exact_pass: bool = False) -> CMIObjective:
    return CMIObjective(MCMILoss(num_classes, lam, momentum), exact_pass)
