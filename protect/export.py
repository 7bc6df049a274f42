"""`protect export`: a run directory → model.onnx (one file, dynamic batch axis) + model.json (the card)."""
from __future__ import annotations

import datetime as dt
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from protect.card import CARD, ONNX, sha256_file
from protect.data import load_dataset
from protect.defaults import CARD_TEMPERATURES
from protect.metrics import classifier_report
from protect.predict import OnnxPredictor, TorchPredictor, card_from_config
from protect.runs import versions

PARITY_TOLERANCE = 1e-5


class ExportError(RuntimeError):
    """The exported model does not reproduce the torch model, or the target cannot be written."""


def _to_onnx(model: torch.nn.Module, input_shape: list[int], path: Path) -> None:
    example = torch.zeros(2, *input_shape)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), input_names=["input"], output_names=["logits"],
                          dynamic_shapes=({0: batch},), external_data=False, verbose=False)


class _Tempered(torch.nn.Module):
    """logits / T: a temperature-recalibrated model (the argmax, hence accuracy, is unchanged)."""

    def __init__(self, model: torch.nn.Module, temperature: float):
        super().__init__()
        self.model, self.temperature = model, float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) / self.temperature


def export_run(run_dir: str | Path, out_dir: str | Path, *, data_dir: str | None = None, force: bool = False,
               parity_rows: int = 512, temperature: float = 1.0) -> dict:
    """Export, check probability parity against torch on real test inputs, write the card. Returns the card.
    `temperature` ≠ 1 bakes logits / T into the model (served probabilities recalibrated, accuracy unchanged)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise ExportError(f"{out_dir} exists and is not empty; pass --force to replace it")
    if not temperature > 0:
        raise ExportError(f"--temperature must be > 0, got {temperature}")
    torch_pred = TorchPredictor(run_dir)
    if temperature != 1.0:
        torch_pred.model = _Tempered(torch_pred.model, temperature).eval()
    config = torch_pred.config
    splits = load_dataset(config["dataset"], data_dir or config.get("data_dir"))
    raw_test = splits.test_x.numpy()

    with tempfile.TemporaryDirectory(dir=out_dir.parent if out_dir.parent.exists() else None) as tmp:
        tmp_dir = Path(tmp)
        _to_onnx(torch_pred.model, config["input_shape"], tmp_dir / ONNX)
        sha = sha256_file(tmp_dir / ONNX)
        card = card_from_config(config, onnx_sha256=sha)
        card.output_temperature = float(temperature)
        (tmp_dir / CARD).write_text(card.model_dump_json(indent=2))
        onnx_pred = OnnxPredictor(tmp_dir)

        sample = raw_test[:parity_rows]
        p_torch = torch.softmax(torch.from_numpy(torch_pred.logits(sample)), 1).numpy()
        p_onnx = torch.softmax(torch.from_numpy(onnx_pred.logits(sample)), 1).numpy()
        gap = float(np.abs(p_torch - p_onnx).max())
        if gap > PARITY_TOLERANCE:
            raise ExportError(f"ONNX/torch parity failed: max |Δp| = {gap:.2e} > {PARITY_TOLERANCE:.0e} on "
                              f"{len(sample)} test rows; nothing was written to {out_dir}")

        logits = torch.from_numpy(onnx_pred.logits(raw_test))
        report = classifier_report(logits, splits.test_y, config["num_classes"], temperatures=CARD_TEMPERATURES)
        card.test_accuracy = report["accuracy"]
        card.cmi = report["cmi"]
        card.created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        import onnx
        import onnxruntime

        card.versions = {**versions(), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
        (tmp_dir / CARD).write_text(card.model_dump_json(indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        shutil.copytree(tmp_dir, out_dir)
    result = card.model_dump()
    result["parity_max_abs_diff"] = gap
    return result
