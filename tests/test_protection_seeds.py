"""experiments.protection_seeds at a tiny scale on digits: its results file, resuming from it with the work
directory gone, importing rows of experiments.protection, and the MCMI-vs-CE paired comparison."""
from __future__ import annotations

import json
import shutil

import pytest

from experiments.seed_report import paired_kd
from tests.conftest import run_cli
from tests.test_bench import SCALE

TEACHER_KEYS = {"mode", "recipe", "seed", "test_accuracy", "outcome", "largest_upper", "calibrated_kd_tau",
                "reference", "families"}


def test_protection_seeds_imports_resumes_from_its_file_and_refuses_other_settings(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    # the same work directory: the ce run and the reference students are shared, as in one session
    run_cli("-m", "experiments.protection", *SCALE, "--teachers", "ce", "--work", str(work),
            "--out", str(tmp_path / "p-out"))
    imported = tmp_path / "p-out" / "protection-digits.json"
    args = ["-m", "experiments.protection_seeds", *SCALE, "--no-reaudit", "--teachers", "ce,cmim",
            "--accuracy-seeds", "2", "--work", str(work), "--out", str(out)]
    run_cli(*args, "--import", str(imported))
    path = out / "protection-seeds-digits.json"
    result = json.loads(path.read_text())
    assert {"command", "date", "machine", "partial", "missing_rows", "settings", "teachers",
            "accuracy_over_teacher_seeds", "mcmi_vs_ce_kd"} <= set(result)
    assert result["partial"] is False and result["missing_rows"] == [] and result["mcmi_vs_ce_kd"] is None
    assert {"seeds", "tau_bounds", "queries"} <= set(result["settings"]) and result["settings"]["tau_bounds"] == [0.02, 50.0]
    ce, cmim = result["teachers"]
    assert TEACHER_KEYS <= set(ce) and (ce["row"], cmim["row"]) == ("ce", "cmim")
    assert ce["source"].startswith("imported") and cmim["source"] == "measured"
    assert ce["test_accuracy"] == json.loads(imported.read_text())["teachers"]["ce"]["teacher"]["test_accuracy"]
    assert set(cmim["families"]) == {"kd", "hard-label"} and set(cmim["families"]["kd"]) == {"queries", "mean",
                                                                                           "upper", "p_holm"}
    assert len(cmim["kd_student_accuracy"]) == cmim["seeds"] == 3 and 0 < cmim["reference"]["accuracy"] < 1
    acc = result["accuracy_over_teacher_seeds"]
    assert set(acc) == {"ce", "cmim"} and all(a["seeds"] == [0, 1] and len(a["per_seed"]) == 2 for a in acc.values())
    assert abs(acc["cmim"]["per_seed"]["0"] - cmim["test_accuracy"]) < 0.01  # one run: the row's and seed 0's
    assert "## Targets" in path.with_suffix(".md").read_text()

    shutil.rmtree(work)  # a new session: only the repository's results file is left
    again = run_cli(*args)
    assert "ce: kept" in again.stdout and "cmim: kept" in again.stdout and not (work / "digits" / "runs").exists()
    second = json.loads(path.read_text())
    assert {k: v for k, v in second.items() if k not in ("date", "command")} == \
        {k: v for k, v in result.items() if k not in ("date", "command")}

    other = run_cli(*args, "--student-epochs", "3", "--import", str(imported), check=False)
    assert other.returncode != 0 and "student_epochs 2 (asked: 3)" in other.stderr


def test_mcmi_vs_ce_kd_is_scipys_paired_t_test():
    from scipy.stats import ttest_rel

    mcmi = [91.2, 90.8, 91.5, 90.9, 91.7, 91.1, 90.6, 91.4]
    ce = [90.9, 90.9, 91.0, 90.7, 91.2, 91.3, 90.2, 91.0]
    got = paired_kd(mcmi, ce)
    assert got["seeds"] == 8 and got["mean"] == pytest.approx(sum(mcmi) / 8 - sum(ce) / 8)
    two = ttest_rel(mcmi, ce)
    greater, less = ttest_rel(mcmi, ce, alternative="greater"), ttest_rel(mcmi, ce, alternative="less")
    assert got["p_two_sided"] == pytest.approx(two.pvalue) and got["p_greater"] == pytest.approx(greater.pvalue)
    assert got["ci95"] == pytest.approx(list(two.confidence_interval(0.95)))
    assert got["lower"] == pytest.approx(greater.confidence_interval(0.95).low)
    assert got["upper"] == pytest.approx(less.confidence_interval(0.95).high)
    # unequal lengths pair the seeds both have; one seed gives no bounds
    assert paired_kd(mcmi, ce[:5])["seeds"] == 5 and paired_kd(mcmi[:1], ce)["upper"] is None
