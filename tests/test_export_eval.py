"""protect export / eval: one-file ONNX with a dynamic batch, parity with torch, a trustworthy card."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from protect.card import ModelDirError, load_card, normalise, verify_model_dir
from protect.cmi import CMIM_DEFAULT_LAMBDA, CMIM_DEFAULT_TEMPERATURES, CMIM_DEFAULT_WEIGHTING
from protect.data import load_dataset
from protect.predict import OnnxPredictor, TorchPredictor
from tests.conftest import run_cli


def test_export_writes_one_file_with_dynamic_batch_and_a_full_card(digits_cmim_model):
    model_dir = digits_cmim_model / "model"
    assert sorted(p.name for p in model_dir.iterdir()) == ["model.json", "model.onnx"]
    graph = onnx.load(str(model_dir / "model.onnx")).graph
    dim0 = graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value  # symbolic batch axis
    card = verify_model_dir(model_dir)
    assert card.mode == "cmim" and card.num_classes == 10 and card.input_shape == [1, 8, 8]
    assert card.options["lam"] == CMIM_DEFAULT_LAMBDA and card.options["weighting"] == CMIM_DEFAULT_WEIGHTING
    assert card.options["temperatures"] == list(CMIM_DEFAULT_TEMPERATURES)
    assert set(card.cmi) == {"1", "4", "16"} and card.test_accuracy > 0.5
    predictor = OnnxPredictor(model_dir)
    for n in (1, 3, 700):  # any batch size
        assert predictor.logits(np.random.rand(n, 1, 8, 8).astype(np.float32), batch_size=4096).shape == (n, 10)


def test_eval_gives_the_same_numbers_for_run_and_model(digits_cmim_model):
    a = json.loads(run_cli("eval", str(digits_cmim_model / "run"), "--json").stdout)
    b = json.loads(run_cli("eval", str(digits_cmim_model / "model"), "--json").stdout)
    assert a["accuracy"] == b["accuracy"]
    for key in ("separation", "ncmi", "ece"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6)
    for t in a["cmi"]:
        assert a["cmi"][t] == pytest.approx(b["cmi"][t], rel=1e-3, abs=1e-7)
    assert b["accuracy"] == pytest.approx(load_card(digits_cmim_model / "model").test_accuracy)


def test_onnx_probabilities_match_torch_on_real_inputs(digits_cmim_model):
    x = load_dataset("digits").test_x[:200].numpy()
    torch_logits = TorchPredictor(digits_cmim_model / "run").logits(x)
    onnx_logits = OnnxPredictor(digits_cmim_model / "model").logits(x)
    softmax = lambda z: np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)  # noqa: E731
    assert np.abs(softmax(torch_logits) - softmax(onnx_logits)).max() < 1e-5


def test_tampered_onnx_is_refused(digits_cmim_model, tmp_path):
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(digits_cmim_model / "model", copy)
    with open(copy / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelDirError, match="does not match"):
        verify_model_dir(copy)
    proc = run_cli("eval", str(copy), check=False)
    assert proc.returncode == 1 and "sha256" in proc.stderr


def test_corrupt_card_is_a_clear_error(tmp_path):
    (tmp_path / "model.json").write_text("{not json")
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(ModelDirError, match="corrupt model card"):
        load_card(tmp_path)


def test_export_refuses_to_overwrite_without_force(digits_cmim_model):
    before = (digits_cmim_model / "model" / "model.json").read_text()
    proc = run_cli("export", str(digits_cmim_model / "run"), "--out", str(digits_cmim_model / "model"), check=False)
    assert proc.returncode == 1 and "--force" in proc.stderr
    assert (digits_cmim_model / "model" / "model.json").read_text() == before


def test_normalise_uses_card_statistics(digits_cmim_model):
    card = load_card(digits_cmim_model / "model")
    x = np.full((2, 1, 8, 8), 0.5, np.float32)
    expected = (0.5 - card.normalization.mean[0]) / card.normalization.std[0]
    assert np.allclose(normalise(x, card), expected)
