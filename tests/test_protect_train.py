"""protect train: every mode learns on digits, runs resume exactly, bad input fails clearly."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from protect.data import DatasetNotFoundError, load_dataset, make_loader, train_and_test_sets
from protect.metrics import TAU_BOUNDS
from protect.models import create_model
from protect.objectives import OBJECTIVES, CrossEntropy
from protect.trainer import CHECKPOINT, NonFiniteLossError, TrainConfig, fit
from tests.conftest import run_cli

CHANCE = 0.1


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["ls", "cmim"])
def test_mode_trains_above_chance(mode, tmp_path):
    out = tmp_path / mode
    # Two epochs: one epoch of CMIM on digits is chaotic (0.46-0.82 over ten seeds; two give 0.85-0.98 over forty).
    proc = run_cli("train", "--mode", mode, "--dataset", "digits", "--epochs", "2", "--quiet", "--json", "--out", str(out))
    summary = json.loads(proc.stdout)
    assert summary["test_accuracy"] > CHANCE + 0.3
    line = _metrics(out)[0]
    assert set(line["test_cmi"]) == {"1", "2", "4", "8", "16", "32"}
    assert {"loss_ce", "train_acc", "test_acc", "seconds"} <= set(line) or {"loss_ls"} <= set(line)
    config = json.loads((out / "config.json").read_text())
    assert config["mode"] == mode and config["dataset"] == "digits" and "torch" in config["versions"]
    assert (out / "model.pt").exists() and (out / CHECKPOINT).exists()


def test_ce_run_fixture_learns(digits_ce_run):
    assert _metrics(digits_ce_run)[-1]["test_acc"] > CHANCE + 0.5


def test_same_seed_trains_the_same_model_and_another_seed_does_not(digits_ce_run, tmp_path):
    # The fixture is `train --mode ce --dataset digits --epochs 2` at the default seed (0).
    def weights(run: Path) -> dict:
        return torch.load(run / "model.pt", weights_only=True)

    for seed in ("0", "1"):
        run_cli("train", "--mode", "ce", "--dataset", "digits", "--epochs", "2", "--seed", seed, "--quiet",
                "--out", str(tmp_path / seed))
    reference, same, other = weights(digits_ce_run), weights(tmp_path / "0"), weights(tmp_path / "1")
    assert all(torch.equal(reference[k], same[k]) for k in reference)
    assert not all(torch.equal(reference[k], other[k]) for k in reference)


def test_mcmi_fine_tunes_a_ce_teacher_and_raises_cmi(digits_ce_run, tmp_path):
    # Paired with a λ=0 fine-tune from the same teacher, seed and batches: only the CMI term differs, so the
    # comparison isolates its effect from whatever further training alone does to CMI.
    def fine_tune(lam: str) -> Path:
        out = tmp_path / f"mcmi-{lam}"
        proc = run_cli("train", "--mode", "mcmi", "--dataset", "digits", "--init", str(digits_ce_run), "--lam", lam,
                       "--epochs", "2", "--lr", "0.01", "--quiet", "--json", "--out", str(out))
        assert json.loads(proc.stdout)["test_accuracy"] > CHANCE + 0.5
        return out

    # λ = 2 raises CMI_1 3.1-3.8× over the control for CE teachers of seeds 0-2 (λ = 0.8: only 1.07-1.21×, too
    # close to any threshold for a test).
    control, mcmi = fine_tune("0"), fine_tune("2")
    assert _metrics(mcmi)[-1]["test_cmi"]["1"] > 1.5 * _metrics(control)[-1]["test_cmi"]["1"]
    assert "loss_cmi" in _metrics(mcmi)[-1] and _metrics(mcmi)[-1]["loss_cmi"] < 0


def test_cmim_init_hardens_a_trained_model_from_its_weights(digits_ce_run, tmp_path):
    # At lr 1e-6 one epoch barely moves the weights: the run keeps the CE model's accuracy only if it started from
    # them (from a random init it would sit near chance).
    out = tmp_path / "cmim-ft"
    proc = run_cli("train", "--mode", "cmim", "--dataset", "digits", "--init", str(digits_ce_run), "--epochs", "1",
                   "--lr", "1e-6", "--quiet", "--json", "--out", str(out))
    ce_acc = _metrics(digits_ce_run)[-1]["test_acc"]
    assert abs(json.loads(proc.stdout)["test_accuracy"] - ce_acc) < 0.02 and ce_acc > CHANCE + 0.5
    assert json.loads((out / "config.json").read_text())["init"] == str(digits_ce_run)


def test_nasty_trains_against_a_reference(digits_ce_run, tmp_path):
    proc = run_cli("train", "--mode", "nasty", "--dataset", "digits", "--reference", str(digits_ce_run),
                   "--epochs", "1", "--quiet", "--json", "--out", str(tmp_path / "nasty"))
    assert json.loads(proc.stdout)["test_accuracy"] > CHANCE + 0.3
    assert _metrics(tmp_path / "nasty")[-1]["loss_nasty"] < 0


def test_ce_mode_through_python_api_beats_chance():
    splits = load_dataset("digits")
    train, test = train_and_test_sets(splits)
    model = create_model("cnn-tiny", 10, 1, 8)
    result = fit(model, CrossEntropy(), make_loader(train, 64, True), make_loader(test, 512, False),
                 TrainConfig(epochs=1, lr=0.05), progress=False)
    assert result.test_accuracy > CHANCE + 0.3


class _InterruptAt:
    """epoch_metrics hook that raises KeyboardInterrupt during a given epoch (before its checkpoint)."""

    def __init__(self, epoch: int):
        self.epoch, self.calls = epoch, 0

    def __call__(self, model, logits, labels):
        self.calls += 1
        if self.calls == self.epoch:
            raise KeyboardInterrupt
        return {}


def _cmim_setup(seed: int = 3):
    torch.manual_seed(seed)
    splits = load_dataset("digits")
    train, test = train_and_test_sets(splits)
    model = create_model("cnn-tiny", 10, 1, 8)
    objective = OBJECTIVES.get("cmim")(10, lam=2.0)
    return model, objective, make_loader(train, 64, True, seed=seed), make_loader(test, 512, False)


def test_resume_after_ctrl_c_equals_an_unbroken_run(tmp_path):
    cfg = TrainConfig(epochs=3, lr=0.05, seed=3)
    model, objective, tl, vl = _cmim_setup()
    straight = fit(model, objective, tl, vl, cfg, tmp_path / "a", progress=False)

    model2, objective2, tl2, vl2 = _cmim_setup()
    first = fit(model2, objective2, tl2, vl2, cfg, tmp_path / "b", progress=False, epoch_metrics=_InterruptAt(2))
    assert first.interrupted and len(first.history) == 1
    assert torch.load(tmp_path / "b" / CHECKPOINT, weights_only=True)["epoch"] == 0  # epoch 1's checkpoint intact
    model3, objective3, tl3, vl3 = _cmim_setup(seed=99)  # fresh weights: the checkpoint must restore everything
    resumed = fit(model3, objective3, tl3, vl3, cfg, tmp_path / "b", resume=True, progress=False)
    assert len(resumed.history) == 3
    for p_a, p_b in zip(model.state_dict().values(), model3.state_dict().values()):
        assert torch.allclose(p_a.float(), p_b.float(), atol=1e-6)
    assert torch.allclose(objective.loss.bank.centroids, objective3.loss.bank.centroids, atol=1e-6)
    assert resumed.test_accuracy == pytest.approx(straight.test_accuracy)
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 3


class _NaNAfterFirstEpoch(CrossEntropy):
    def forward_train(self, model, batch):
        logits, losses = super().forward_train(model, batch)
        if self.epoch >= 1:
            losses["ce"] = losses["ce"] * float("nan")
        return logits, losses


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path):
    splits = load_dataset("digits")
    train, test = train_and_test_sets(splits)
    model = create_model("cnn-tiny", 10, 1, 8)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at epoch 2"):
        fit(model, _NaNAfterFirstEpoch(), make_loader(train, 64, True), make_loader(test, 512, False),
            TrainConfig(epochs=3), tmp_path, progress=False)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert state["epoch"] == 0 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("flag,value,names", [("--mode", "bogus", "cmim"), ("--dataset", "mnist-x", "fashion-mnist"),
                                             ("--arch", "vgg99", "cnn-small")])
def test_unknown_names_list_valid_ones(flag, value, names, tmp_path):
    args = ["train", "--dataset", "digits", "--out", str(tmp_path / "r"), flag, value]
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2
    assert value in proc.stderr and names in proc.stderr
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_missing_dataset_files_say_how_to_get_them(monkeypatch, tmp_path):
    import protect.data as data

    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "none")
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", tmp_path / "empty")
    with pytest.raises(DatasetNotFoundError, match="--data-dir"):
        load_dataset("cifar10", tmp_path)


def test_init_with_other_classes_is_refused_before_training(digits_ce_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(digits_ce_run, other)
    config = json.loads((other / "config.json").read_text())
    config["num_classes"] = 5
    (other / "config.json").write_text(json.dumps(config))
    proc = run_cli("train", "--mode", "mcmi", "--dataset", "digits", "--init", str(other), "--epochs", "1",
                   "--out", str(tmp_path / "m"), check=False)
    assert proc.returncode == 2 and "num_classes=5" in proc.stderr
    assert not (tmp_path / "m" / "checkpoint.pt").exists()


def test_corrupt_checkpoint_is_reported_and_left_untouched(digits_ce_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(digits_ce_run, run)
    (run / CHECKPOINT).write_bytes(b"not a checkpoint")
    proc = run_cli("train", "--out", str(run), "--resume", check=False)
    assert proc.returncode == 1 and "cannot read checkpoint" in proc.stderr
    assert (run / CHECKPOINT).read_bytes() == b"not a checkpoint"


def test_existing_run_is_not_overwritten_without_resume(digits_ce_run):
    before = (digits_ce_run / "metrics.jsonl").read_text()
    proc = run_cli("train", "--mode", "ce", "--dataset", "digits", "--out", str(digits_ce_run), check=False)
    assert proc.returncode == 2 and "--resume" in proc.stderr
    assert (digits_ce_run / "metrics.jsonl").read_text() == before


def test_teacher_and_cli_do_not_import_each_other():
    """protect/teacher.py takes its defaults and usage error from protect/defaults.py; the CLI re-exports them."""
    import subprocess
    import sys

    code = ("import sys, protect.teacher; assert 'protect.cli' not in sys.modules, 'protect.teacher imports protect.cli'; "
            "import protect.cli, protect.defaults as d; "
            "assert protect.cli.DATASET_DEFAULTS is d.DATASET_DEFAULTS and protect.cli.UsageError is d.UsageError")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_calibrated_cmim_trains_records_its_option_and_is_measured_at_the_attackers_scale(digits_ce_run, tmp_path):
    out = tmp_path / "cal"
    proc = run_cli("train", "--mode", "cmim", "--calibrated", "--lam", "2", "--dataset", "digits", "--epochs", "2",
                   "--quiet", "--json", "--out", str(out))
    assert json.loads(proc.stdout)["test_accuracy"] > CHANCE + 0.3
    assert json.loads((out / "config.json").read_text())["objective_options"]["calibrated"] is True
    state = torch.load(out / CHECKPOINT, weights_only=True)["objective"]
    log_tau = next(v for k, v in state.items() if k.endswith("log_tau"))
    assert torch.isfinite(log_tau) and float(log_tau) != 0.0  # τ was fitted, not left at its initial 1
    bench = run_cli("-m", "experiments.calibrated_cmi", str(digits_ce_run), str(out), "--dataset", "digits",
                    "--budget", "1000", "--out", str(tmp_path / "leak"))
    rows = json.loads((tmp_path / "leak.json").read_text())["teachers"]
    assert set(rows) == {digits_ce_run.name, "cal"} and "| cal |" in bench.stdout
    for r in rows.values():
        assert TAU_BOUNDS[0] - 1e-6 <= r["tau"] <= TAU_BOUNDS[1] + 1e-6 and r["cmi_at_tau_given_top1"] >= 0 and 0 <= r["within_class_logp_variance_share"] <= 1


def test_calibrated_with_exact_centroids_is_refused_before_training(tmp_path):
    proc = run_cli("train", "--mode", "cmim", "--calibrated", "--exact-centroids", "--dataset", "digits",
                   "--out", str(tmp_path / "r"), check=False)
    assert proc.returncode == 2
    assert "--calibrated and --exact-centroids" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()
