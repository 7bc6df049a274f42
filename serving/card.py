"""Read and verify a model directory (docs/interfaces.md) without importing torch.

`protect.card` is the reference reader, but importing it pulls in `protect/__init__` and with it torch
(seconds of start-up and gigabytes in a bento). This reader follows the same contract (schema_version 1);
tests/test_serving.py checks that it agrees with `protect.card.verify_model_dir` on a real export.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

CARD = "model.json"
ONNX = "model.onnx"


class ModelDirError(RuntimeError):
    """A model directory with a missing file, a corrupt card, or an ONNX file that does not match the card."""


class Normalization(BaseModel):
    mean: list[float]
    std: list[float]


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    schema_version: int = 1
    classes: list[str]
    num_classes: int
    input_shape: list[int] = Field(min_length=3, max_length=3)
    normalization: Normalization
    input_name: str = "input"
    output_name: str = "logits"
    dataset: str = ""
    arch: str = ""
    mode: str = ""
    options: dict = Field(default_factory=dict)
    test_accuracy: float | None = None
    cmi: dict[str, float] = Field(default_factory=dict)
    onnx_sha256: str


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_model_dir(model_dir: str | Path) -> ModelCard:
    model_dir = Path(model_dir)
    card_path, onnx_path = model_dir / CARD, model_dir / ONNX
    if not card_path.exists():
        raise ModelDirError(f"{model_dir}: no {CARD}; make a model directory with `protect export RUN_DIR --out DIR` "
                            "and point UNDISTILLABLE_MODEL_DIR at it")
    try:
        card = ModelCard.model_validate(json.loads(card_path.read_text()))
    except (json.JSONDecodeError, ValidationError, UnicodeDecodeError) as exc:
        raise ModelDirError(f"{card_path}: corrupt model card: {exc}") from exc
    if card.schema_version != 1:
        raise ModelDirError(f"{card_path}: schema_version {card.schema_version}, this server reads 1")
    channels = card.input_shape[0]
    if len(card.normalization.mean) != channels or len(card.normalization.std) != channels:
        raise ModelDirError(f"{card_path}: normalization has {len(card.normalization.mean)} means for {channels} channels")
    if len(card.classes) != card.num_classes:
        raise ModelDirError(f"{card_path}: {len(card.classes)} class names for num_classes={card.num_classes}")
    if not onnx_path.exists():
        raise ModelDirError(f"{model_dir}: no {ONNX} beside the model card")
    actual = sha256_file(onnx_path)
    if actual != card.onnx_sha256:
        raise ModelDirError(f"{onnx_path}: sha256 {actual[:16]}… does not match the card's {card.onnx_sha256[:16]}…; "
                            "the file was changed or replaced after export")
    return card


def normalise(x: np.ndarray, card: ModelCard) -> np.ndarray:
    mean = np.asarray(card.normalization.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(card.normalization.std, dtype=np.float32).reshape(1, -1, 1, 1)
    return ((np.asarray(x, dtype=np.float32) - mean) / std).astype(np.float32)
