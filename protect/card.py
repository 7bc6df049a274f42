"""The model card (`model.json`) beside `model.onnx`: what serving, audit and eval need to trust a model dir."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field, ValidationError

CARD = "model.json"
ONNX = "model.onnx"
SCHEMA_VERSION = 1


class ModelDirError(RuntimeError):
    """A model directory that is missing a file, has a corrupt card, or whose ONNX file does not match it."""


class Normalization(BaseModel):
    """Per-channel mean and std applied to raw [0, 1] pixels; the card's field and /metadata's."""

    mean: list[float]
    std: list[float]


class ModelCard(BaseModel):
    schema_version: int = SCHEMA_VERSION
    classes: list[str]
    num_classes: int
    input_shape: list[int] = Field(description="(C, H, W) of one input")
    normalization: Normalization
    input_name: str = "input"
    output_name: str = "logits"
    dataset: str
    arch: str
    mode: str
    options: dict = Field(default_factory=dict)
    output_temperature: float = Field(1.0, description="the exported logits are the trained model's divided by it")
    test_accuracy: float | None = None
    cmi: dict[str, float] = Field(default_factory=dict)
    onnx_sha256: str
    created: str = ""
    versions: dict[str, str] = Field(default_factory=dict)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_card(model_dir: str | Path) -> ModelCard:
    path = Path(model_dir) / CARD
    if not path.exists():
        raise ModelDirError(f"{model_dir}: no {CARD}; make a model directory with `protect export RUN_DIR --out DIR`")
    try:
        return ModelCard.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValidationError, UnicodeDecodeError) as exc:
        raise ModelDirError(f"{path}: corrupt model card: {exc}") from exc


def verify_model_dir(model_dir: str | Path) -> ModelCard:
    """Load the card and check that model.onnx exists and matches its sha256."""
    card = load_card(model_dir)
    onnx_path = Path(model_dir) / ONNX
    if not onnx_path.exists():
        raise ModelDirError(f"{model_dir}: no {ONNX} beside the model card")
    actual = sha256_file(onnx_path)
    if actual != card.onnx_sha256:
        raise ModelDirError(f"{onnx_path}: sha256 {actual[:16]}… does not match the card's {card.onnx_sha256[:16]}…; "
                            "the file was changed or replaced after export")
    return card


def normalise(x: np.ndarray, card: ModelCard) -> np.ndarray:
    """Raw [0, 1] pixels (N, C, H, W) → the model's input, per-channel (x − mean) / std, float32."""
    mean = np.asarray(card.normalization.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(card.normalization.std, dtype=np.float32).reshape(1, -1, 1, 1)
    return ((np.asarray(x, dtype=np.float32) - mean) / std).astype(np.float32)
