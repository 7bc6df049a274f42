"""The benchmark drivers run end to end at a tiny scale on digits and write their results files."""
from __future__ import annotations

import json
import math
import statistics

from tests.conftest import run_cli

SCALE = ["--dataset", "digits", "--teacher-arch", "cnn-tiny", "--teacher-epochs", "2", "--train-limit", "0",
         "--student-arch", "cnn-tiny", "--student-epochs", "1", "--budget", "256", "--seeds", "2",
         "--attacks", "kd-T4-a0.9,hard-label", "--quiet"]


def test_protection_benchmark_writes_teachers_targets_and_policies(tmp_path):
    run_cli("-m", "bench.protection", *SCALE, "--teachers", "ce,cmim,ce-top1", "--work", str(tmp_path / "work"),
            "--out", str(tmp_path / "out"))
    result = json.loads((tmp_path / "out" / "protection-digits.json").read_text())
    rows = result["teachers"]
    assert set(rows) == {"ce", "cmim", "ce-top1"}
    assert rows["ce-top1"]["policy"]["kind"] == "topk"
    assert rows["cmim"]["teacher"]["cmi"]["1"] < rows["ce"]["teacher"]["cmi"]["1"]
    for name in ("ce", "cmim"):
        assert set(rows[name]["audit"]["deltas"]) == {"kd-T4-a0.9", "hard-label"}
    # top-1 answers carry one non-zero entry per row: the audit treats them as labels and says what it skipped
    assert set(rows["ce-top1"]["audit"]["deltas"]) == {"hard-label"}
    assert "kd-T4-a0.9" in [t["attack"] for t in rows["ce-top1"]["audit"]["not_tried"]]
    assert all(row["audit"]["queries"] == 256 for row in rows.values())
    assert {t["target"].split(" ")[0] for t in result["targets"]} >= {"CMIM", "CE"}
    assert result["recorded_training_seconds"]["students"] > 0
    md = (tmp_path / "out" / "protection-digits.md").read_text()
    assert "| ce-top1 |" in md and "## Targets" in md


def test_ablation_benchmark_reuses_finished_work(tmp_path):
    args = ["-m", "bench.ablation", *SCALE, "--variants", "ce,cmim-lam20", "--work", str(tmp_path / "work"),
            "--out", str(tmp_path / "out")]
    run_cli(*args)
    first = json.loads((tmp_path / "out" / "ablation-digits.json").read_text())
    assert set(first["variants"]) == {"ce", "cmim-lam20"}
    assert first["variants"]["cmim-lam20"]["flags"] == ["--lam", "20"]
    students = (tmp_path / "work" / "digits" / "reports" / "ce" / "students.jsonl").read_text()
    run_cli(*args)  # everything reused: no student trained twice, same numbers
    assert (tmp_path / "work" / "digits" / "reports" / "ce" / "students.jsonl").read_text() == students
    second = json.loads((tmp_path / "out" / "ablation-digits.json").read_text())
    assert second["variants"] == first["variants"]


def test_serving_benchmark_measures_the_service_against_a_bare_baseline(model_dir, tmp_path):
    out = tmp_path / "serving.json"
    run_cli("-m", "bench.serving", "--model-dir", str(model_dir), "--rounds", "2", "--requests", "40", "--batch", "64",
            "--batches-per-round", "2", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["command"] == (f"python -m bench.serving --model-dir {model_dir} --rounds 2 --requests 40 --batch 64 "
                                 f"--batches-per-round 2 --out {out}")
    for field in ("single_c8_vs_bare", "single_c8_p99_over_p50"):
        assert math.isfinite(result[field]) and result[field] > 0, field
    c8 = result["single_image"]["c8"]
    assert c8["service"]["requests"] == c8["bare"]["requests"] == 2 * 40 and len(c8["vs_bare_per_round"]) == 2
    assert result["single_c8_vs_bare"] == statistics.median(c8["vs_bare_per_round"])
    assert result["no_5xx"] and "keys required" in result["server"]["keys"]
    md = out.with_suffix(".md").read_text()
    assert result["command"] in md and "bare Starlette" in md
