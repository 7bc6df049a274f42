"""The benchmark drivers run end to end at a tiny scale on digits and write their results files."""
from __future__ import annotations

import json
import math
import statistics

from tests.conftest import run_cli

SCALE = ["--dataset", "digits", "--teacher-arch", "cnn-tiny", "--teacher-epochs", "2", "--student-arch", "cnn-tiny",
         "--student-epochs", "2", "--budget", "300", "--seeds", "3", "--attacks", "kd-T4-a0.9,hard-label",
         "--jobs", "1", "--threads", "1", "--quiet", "--audit", "default"]


def test_protection_benchmark_writes_teachers_targets_and_policies(tmp_path):
    run_cli("-m", "experiments.protection", *SCALE, "--teachers", "ce,cmim,ce-top1,cmim-cal",
            "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"))
    result = json.loads((tmp_path / "out" / "protection-digits.json").read_text())
    rows = result["teachers"]
    assert list(rows) == ["ce", "cmim", "ce-top1", "cmim-cal"]
    assert rows["ce-top1"]["policy"]["kind"] == "topk"
    assert rows["cmim"]["teacher"]["cmi"]["1"] < rows["ce"]["teacher"]["cmi"]["1"]
    for name in ("ce", "cmim", "cmim-cal"):
        a = rows[name]["audit"]
        assert set(a["families"]) == {"kd", "hard-label"} and a["outcome"] in ("distillable", "undistillable",
                                                                              "inconclusive")
        assert a["largest_upper"] == max(f["upper"] for f in a["families"].values()) and a["seeds"] == 3
    # the recalibrated model serves logits / τ: same accuracy, its own temperature on the card
    cal, cmim = rows["cmim-cal"]["teacher"], rows["cmim"]["teacher"]
    assert cal["test_accuracy"] == cmim["test_accuracy"] and cal["output_temperature"] != 1.0
    # top-1 answers carry one non-zero entry per row: the audit treats them as labels and says what it skipped
    assert set(rows["ce-top1"]["audit"]["families"]) == {"hard-label"}
    assert "kd" in [t["attack"] for t in rows["ce-top1"]["audit"]["not_tried"]]
    # the reference students never see a teacher: every row has the same LS student
    assert len({r["audit"]["ls_student_accuracy"] for r in rows.values()}) == 1
    assert all(row["audit"]["queries"] == 300 for row in rows.values())
    assert {t["target"].split(" ")[0] for t in result["targets"]} >= {"CMIM", "CE"}
    assert result["recorded_training_seconds"]["students"] > 0
    md = (tmp_path / "out" / "protection-digits.md").read_text()
    assert "| ce-top1 |" in md and "## Targets" in md and "**ce**:" in md


def test_ablation_benchmark_reuses_finished_work(tmp_path):
    args = ["-m", "experiments.ablation", *SCALE, "--variants", "ce,cmim-lam20-max", "--work", str(tmp_path / "work"),
            "--out", str(tmp_path / "out")]
    run_cli(*args)
    first = json.loads((tmp_path / "out" / "ablation-digits.json").read_text())
    assert set(first["variants"]) == {"ce", "cmim-lam20-max"}
    assert first["variants"]["cmim-lam20-max"]["flags"] == ["--lam", "20", "--aggregator", "max", "--lam-warmup", "0",
                                                            "--temperatures", "1,2,4,8,16", "--weighting", "1"]
    options = first["variants"]["cmim-lam20-max"]["teacher"]["options"]
    # a variant measured before the defaults moved still trains what it was measured with
    assert options["aggregator"] == "max" and options["lam_warmup"] == 0
    assert options["temperatures"] == [1, 2, 4, 8, 16] and options["weighting"] == "1"
    students = (tmp_path / "work" / "digits" / "reports" / "ce" / "students.jsonl").read_text()
    run_cli(*args)  # everything reused: no student trained twice, same numbers
    assert (tmp_path / "work" / "digits" / "reports" / "ce" / "students.jsonl").read_text() == students
    second = json.loads((tmp_path / "out" / "ablation-digits.json").read_text())
    assert {n: v["audit"] for n, v in second["variants"].items()} == {n: v["audit"] for n, v in first["variants"].items()}


def test_serving_benchmark_measures_the_service_against_a_bare_baseline(model_dir, tmp_path):
    out = tmp_path / "serving.json"
    run_cli("-m", "bench.serving", "--model-dir", str(model_dir), "--rounds", "2", "--requests", "40", "--batch", "64",
            "--batches-per-round", "2", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["command"] == (f"python -m bench.serving --model-dir {model_dir} --rounds 2 --requests 40 --batch 64 "
                                 f"--batches-per-round 2 --out {out}")
    for field in ("single_c8_vs_bare", "single_c8_vs_bentoml", "single_c8_p99_over_p50"):
        assert math.isfinite(result[field]) and result[field] > 0, field
    c8 = result["single_image"]["c8"]
    assert c8["service"]["requests"] == c8["bare"]["requests"] == c8["bentoml"]["requests"] == 2 * 40
    assert len(c8["vs_bare_per_round"]) == len(c8["vs_bentoml_per_round"]) == 2
    assert result["single_c8_vs_bare"] == statistics.median(c8["vs_bare_per_round"])
    assert result["single_c8_vs_bentoml"] == statistics.median(c8["vs_bentoml_per_round"])
    assert result["no_5xx"] and "keys required" in result["server"]["keys"]
    md = out.with_suffix(".md").read_text()
    assert result["command"] in md and "bare Starlette" in md and "without the gate" in md


def test_teacher_seeds_benchmark_pairs_the_drop_by_seed_and_reuses_runs(tmp_path):
    args = ["-m", "experiments.teacher_seeds", "--dataset", "digits", "--teacher-arch", "cnn-tiny",
            "--teacher-epochs", "1",
            "--teachers", "ce,cmim", "--seeds", "2", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    run_cli(*args)
    result = json.loads((tmp_path / "out" / "teacher-seeds-digits.json").read_text())
    ce, cmim = result["teachers"]["ce"], result["teachers"]["cmim"]
    runs = tmp_path / "work" / "digits" / "runs"
    assert [json.loads((runs / run / "config.json").read_text())["train"]["seed"] for run in ("cmim", "cmim@1")] == [0, 1]
    drop = cmim["drop_vs_ce"]
    assert drop["per_seed"] == [round(100 * (ce["accuracy"][s] - cmim["accuracy"][s]), 3) for s in ("0", "1")]
    assert drop["upper"] >= drop["mean"] and cmim["drop_within_target"] == (drop["mean"] <= 0.3)
    stamps = {p: p.stat().st_mtime for p in runs.glob("*/model.pt")}
    run_cli(*args)  # every run reused
    assert {p: p.stat().st_mtime for p in runs.glob("*/model.pt")} == stamps
    again = json.loads((tmp_path / "out" / "teacher-seeds-digits.json").read_text())["teachers"]
    # the training time comes from the runs' epochs, so a rerun that only reuses them still reports it
    assert again["cmim"]["training_seconds"] == cmim["training_seconds"] and all(
        v > 0 for r in again.values() for v in r["training_seconds"].values())
    assert "| cmim |" in (tmp_path / "out" / "teacher-seeds-digits.md").read_text()
    # the same work directory at another epoch count is refused, not silently reused as if trained at 2 epochs
    other = run_cli(*args, "--teacher-epochs", "2", check=False)  # argparse keeps an option's last value
    assert other.returncode != 0 and "epochs 1 (asked: 2)" in other.stderr and "--work" in other.stderr
    assert {p: p.stat().st_mtime for p in runs.glob("*/model.pt")} == stamps


def test_protection_benchmark_runs_the_query_strategies_families(tmp_path):
    """`--queries` reaches the audits: the families on mixup's inputs, the winning label-only reference and the
    per-strategy table are in the results."""
    args = [a if a != "kd-T4-a0.9,hard-label" else "kd-T4-a0.9" for a in SCALE]
    run_cli("-m", "experiments.protection", *args, "--budget", "600", "--teachers", "ce", "--queries", "rows,mixup",
            "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"))
    a = json.loads((tmp_path / "out" / "protection-digits.json").read_text())["teachers"]["ce"]["audit"]
    assert set(a["families"]) == {"kd", "kd@mixup"} and a["families"]["kd@mixup"]["queries"] == "mixup"
    assert a["reference"]["family"] in ("ls", "ls@mixup") and a["query_budget"]["total"] <= 600
    assert a["query_strategies"]["mixup"]["queries"] == a["query_budget"]["synthetic"] > 0
    assert "## Strongest family per query strategy" in (tmp_path / "out" / "protection-digits.md").read_text()
