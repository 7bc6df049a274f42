"""A training run directory: config.json (every option, versions, dataset) and the trained weights."""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch
from torch import nn

from protect.atomic import write_json_atomic
from protect.models import create_model
from protect.trainer import CHECKPOINT, WEIGHTS, CheckpointError, load_checkpoint

CONFIG = "config.json"


class RunDirError(RuntimeError):
    """A run directory that cannot be used; the message says why."""


def versions() -> dict[str, str]:
    import numpy

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": numpy.__version__,
           "platform": platform.platform()}
    try:
        from importlib.metadata import version

        out["undistillable"] = version("undistillable")
    except Exception:  # not installed as a distribution (running from a source tree)
        pass
    return out


def write_config(run_dir: Path, config: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / CONFIG, config)


def read_config(run_dir: str | Path) -> dict:
    path = Path(run_dir) / CONFIG
    if not path.exists():
        raise RunDirError(f"{run_dir}: no {CONFIG}; is this a directory made by `protect train --out`?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunDirError(f"{path}: corrupt run config: {exc}") from exc


def build_model(config: dict) -> nn.Module:
    c, h, _ = config["input_shape"]
    return create_model(config["arch"], num_classes=config["num_classes"], in_channels=c, image_size=h)


def load_run_model(run_dir: str | Path) -> tuple[nn.Module, dict]:
    """The run's model with its trained weights (model.pt, else the last checkpoint), in eval mode."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    model = build_model(config)
    if (run_dir / WEIGHTS).exists():
        try:
            state = torch.load(run_dir / WEIGHTS, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"cannot read weights {run_dir / WEIGHTS}: {exc}") from exc
    elif (run_dir / CHECKPOINT).exists():
        state = load_checkpoint(run_dir / CHECKPOINT)["model"]
    else:
        raise RunDirError(f"{run_dir}: no trained weights ({WEIGHTS} or {CHECKPOINT}); has the run finished an epoch?")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{run_dir}: weights do not fit architecture {config['arch']!r}: {exc}") from exc
    return model.eval(), config
