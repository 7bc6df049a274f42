"""The shape every loss takes, teachers' objectives and audit attacks alike (mdistiller style)."""
from __future__ import annotations

from torch import Tensor, nn


class Objective(nn.Module):
    """One training objective.

    `forward_train(model, batch)` returns the model's logits on `batch["x"]` and a dict of named scalar
    losses that the trainer sums. Submodules with parameters (critics, auxiliary heads) are trained
    with the model; buffers (centroids) are saved in checkpoints.
    """

    def __init__(self) -> None:
        super().__init__()
        self.epoch = 0
        self.total_epochs = 1

    def forward_train(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        self.epoch, self.total_epochs = epoch, total_epochs

    def begin_epoch(self, model: nn.Module, loader, device) -> None:
        """Hook before each epoch's first step (CMIM's exact centroid pass uses it)."""

    def options(self) -> dict:
        """The objective's options, recorded in config.json and the model card."""
        return {}
