"""One way to get logits from raw [0, 1] pixels, whether the model is a torch run or an exported ONNX dir."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from protect.card import ONNX, ModelCard, Normalization, normalise, verify_model_dir
from protect.host import onnx_session
from protect.runs import load_run_model


class Predictor:
    """logits(raw pixels) for a model, plus what its card says about inputs and classes."""

    card: ModelCard

    def logits(self, raw: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        out = [self._logits(normalise(raw[i:i + batch_size], self.card)) for i in range(0, len(raw), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.card.num_classes), np.float32)

    def _logits(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class OnnxPredictor(Predictor):
    def __init__(self, model_dir: str | Path, intra_threads: int | None = None):
        self.card = verify_model_dir(model_dir)
        self.session = onnx_session(Path(model_dir) / ONNX, intra_threads)

    def _logits(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.card.output_name], {self.card.input_name: x})[0]


class TorchPredictor(Predictor):
    def __init__(self, run_dir: str | Path):
        self.model, self.config = load_run_model(run_dir)
        self.card = card_from_config(self.config, onnx_sha256="")

    @torch.no_grad()
    def _logits(self, x: np.ndarray) -> np.ndarray:
        return self.model(torch.from_numpy(x)).float().numpy()


def card_from_config(config: dict, onnx_sha256: str, **extra) -> ModelCard:
    return ModelCard(classes=config["classes"], num_classes=config["num_classes"], input_shape=config["input_shape"],
                     normalization=Normalization(**config["normalization"]), dataset=config["dataset"],
                     arch=config["arch"], mode=config["mode"], options=config.get("objective_options", {}),
                     onnx_sha256=onnx_sha256, **extra)


def load_predictor(path: str | Path) -> Predictor:
    """A model directory (model.onnx + model.json) or a run directory (config.json + weights)."""
    path = Path(path)
    if (path / ONNX).exists() or (path / "model.json").exists():
        return OnnxPredictor(path, intra_threads=int(os.environ.get("UNDISTILLABLE_ORT_THREADS", "0")) or None)
    return TorchPredictor(path)
