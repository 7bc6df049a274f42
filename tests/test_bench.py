"""The benchmark drivers run end to end at a tiny scale on digits and write their results files."""
from __future__ import annotations

import json

from tests.conftest import run_cli

SCALE = ["--dataset", "digits", "--teacher-arch", "cnn-tiny", "--teacher-epochs", "2", "--student-arch", "cnn-tiny",
         "--student-epochs", "2", "--budget", "300", "--seeds", "3", "--attacks", "kd-T4-a0.9,hard-label",
         "--jobs", "1", "--threads", "1", "--quiet"]


def test_protection_benchmark_writes_teachers_targets_and_policies(tmp_path):
    run_cli("-m", "bench.protection", *SCALE, "--teachers", "ce,cmim,ce-top1,cmim-cal", "--work", str(tmp_path / "work"),
            "--out", str(tmp_path / "out"))
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
    args = ["-m", "bench.ablation", *SCALE, "--variants", "ce,cmim-lam20-max", "--work", str(tmp_path / "work"),
            "--out", str(tmp_path / "out")]
    run_cli(*args)
    first = json.loads((tmp_path / "out" / "ablation-digits.json").read_text())
    assert set(first["variants"]) == {"ce", "cmim-lam20-max"}
    assert first["variants"]["cmim-lam20-max"]["flags"] == ["--lam", "20", "--aggregator", "max"]
    assert first["variants"]["cmim-lam20-max"]["teacher"]["options"]["aggregator"] == "max"
    students = (tmp_path / "work" / "digits" / "reports" / "ce" / "students.jsonl").read_text()
    run_cli(*args)  # everything reused: no student trained twice, same numbers
    assert (tmp_path / "work" / "digits" / "reports" / "ce" / "students.jsonl").read_text() == students
    second = json.loads((tmp_path / "out" / "ablation-digits.json").read_text())
    assert {n: v["audit"] for n, v in second["variants"].items()} == {n: v["audit"] for n, v in first["variants"].items()}
