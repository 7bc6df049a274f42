"""Query strategies: every query counted against the budget, cached with its inputs and resumed without
a second query (over a real `bentoml serve`); the verdict's label-only reference over every strategy's inputs (a
teacher whose answers are noise is never distillable); calibrated-kd's τ range; the new flags' errors."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings as hsettings, strategies as st

from audit.attacks import expand_attacks
from audit.cli import main
from audit.oracle import OnnxOracle
from audit.queries import QUERIES, rows_for_budget, synthetic_total
from protect.metrics import TAU_BOUNDS, at_tau_bound, fit_temperature
from test_audit_run import bento, keys_cli, served_rows

ALL = "rows,mixup,boundary"
SMALL = ["--dataset", "digits", "--student", "cnn-tiny", "--seeds", "2", "--epochs", "2", "--budget", "600",
         "--query-batch", "100", "--jobs", "1", "--threads", "1", "--ls-epsilons", "0.1", "--quiet"]


def audit(*args) -> int:
    return main(["run", *args])


def report_of(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


@hsettings(max_examples=200, deadline=None)
@given(budget=st.integers(0, 20000), available=st.integers(1, 5000), rounds=st.integers(1, 4),
       strategies=st.sampled_from([["rows"], ["rows", "mixup"], ["rows", "boundary"], ["rows", "mixup", "boundary"]]),
       val=st.sampled_from([0.05, 0.1, 0.3]))
def test_the_budget_split_counts_every_query_and_wastes_none(budget, available, rounds, strategies, val):
    rows = rows_for_budget(budget, available, strategies, rounds, val)
    assert 0 <= rows <= min(budget, available)
    assert rows + synthetic_total(strategies, rows, rounds, val) <= budget
    if rows < available:  # one more real row would not fit with its synthetic queries
        assert rows + 1 + synthetic_total(strategies, rows + 1, rounds, val) > budget
    if strategies == ["rows"]:
        assert rows == min(budget, available)  # rows alone: --budget as before query strategies


def test_tau_search_reaches_the_scale_of_an_under_confident_teacher(digits_ce_model):
    """A teacher's logits scaled by 0.15 (CMIM's measured τ ≈ 0.14–0.20) → τ scales with them, off the bounds."""
    from protect.data import load_dataset
    from protect.predict import OnnxPredictor

    splits = load_dataset("digits")
    z = torch.from_numpy(OnnxPredictor(digits_ce_model).logits(splits.test_x.numpy())).double()
    tau = fit_temperature(torch.log_softmax(z, 1), splits.test_y)
    scaled = fit_temperature(torch.log_softmax(0.15 * z, 1), splits.test_y)
    assert scaled == pytest.approx(0.15 * tau, rel=0.05) and at_tau_bound(scaled) is None
    assert TAU_BOUNDS == (0.02, 50.0)
    # the range is part of calibrated-kd's students' keys: one fitted in another range is never reused
    assert expand_attacks("calibrated-kd")[0].options == {"tau_bounds": list(TAU_BOUNDS)}
    assert at_tau_bound(TAU_BOUNDS[0]) == "lower" and at_tau_bound(TAU_BOUNDS[1]) == "upper"


def test_bentoml_every_strategy_is_counted_cached_and_resumed_without_a_second_query(digits_ce_model, tmp_path,
                                                                                      capsys):
    """--budget 600 over rows, mixup and boundary: a key with 450 rows runs out during the adaptive boundary
    waves (429), a second key finishes, a third run asks nothing; the server's ledger holds 600 rows, each batch
    once, and the report records the fitted τ of calibrated-kd."""
    db = tmp_path / "keys.sqlite"
    small = keys_cli(db, "add", "auditor-1", "--budget", "450").strip()
    big = keys_cli(db, "add", "auditor-2").strip()
    out = tmp_path / "report"
    args = [*SMALL, "--attacks", "kd-T4-a0.9,calibrated-kd", "--queries", ALL, "--retries", "1", "--out", str(out)]
    server = bento(digits_ce_model, tmp_path).start()
    try:
        assert audit("--endpoint", server.url, "--api-key", small, *args) == 1
        err = capsys.readouterr().err
        assert "429" in err and "over_budget" in err
        have = {s: int(np.load(out / "queries" / s / "cache" / "have.npy").sum()) for s in ("mixup", "boundary")}
        assert int(np.load(out / "cache" / "have.npy").sum()) == 215 and have == {"mixup": 193, "boundary": 0}
        assert audit("--endpoint", server.url, "--api-key", big, *args) == 0
        first = report_of(out)
        students = (out / "students.jsonl").read_text()
        assert audit("--endpoint", server.url, "--api-key", big, *args) == 0
    finally:
        server.stop()
    q = first["queries"]
    assert q["budget"] == {"budget": 600, "rows": 215, "synthetic": 385, "total": 600, "rule": q["budget"]["rule"]}
    assert {s: (e["queries"], e["asked_this_run"], e["cached_before_this_run"]) for s, e in q["strategies"].items()} \
        == {"rows": (215, 0, 215), "mixup": (193, 0, 193), "boundary": (192, 192, 0)}
    assert served_rows(db) == {"auditor-1": 408, "auditor-2": 192}  # 600 queries in all, each asked once
    digests = [b["digest"] for name in ("auditor-1", "auditor-2") for b in json.loads(keys_cli(db, "ledger", name,
                                                                                               "--json"))]
    assert len(digests) == len(set(digests)) == 3 + 2 + 4  # rows, mixup, then the boundary's 4 adaptive waves
    again = report_of(out)
    assert again["queries"]["asked_this_run_all"] == 0 and (out / "students.jsonl").read_text() == students
    assert again["verdict"]["families"] == first["verdict"]["families"]
    # the synthesised inputs are stored with their answers: the cache holds what the server was asked
    for s, n in (("mixup", 193), ("boundary", 192)):
        inputs = np.load(out / "queries" / s / "inputs.npy")
        assert inputs.shape == (n, 1, 8, 8) and 0 <= inputs.min() and inputs.max() <= 1
        assert json.loads((out / "queries" / s / "cache" / "fingerprint.json").read_text())["strategy"] == s
    assert {n: e["queries"] for n, e in first["attacks"].items()} == {
        "kd": "rows", "calibrated-kd": "rows", "kd@mixup": "mixup", "kd@boundary": "boundary"}
    tau = first["attacks"]["calibrated-kd"]["fitted_tau"]
    assert tau["bounds"] == [0.02, 50.0] and TAU_BOUNDS[0] <= tau["tau"] <= TAU_BOUNDS[1]
    assert tau["at_bound"] == at_tau_bound(tau["tau"])
    assert "fitted τ" in (out / "report.md").read_text()


class NoiseOracle:
    """A teacher whose answers carry nothing: a Dirichlet(1) draw seeded by each input's bytes (so a resumed audit
    gets the same noise), behind the metadata of a real exported model."""

    def __init__(self, model_dir: Path):
        self.real = OnnxOracle(model_dir)

    def metadata(self):
        return self.real.metadata()

    def query(self, raw: np.ndarray) -> np.ndarray:
        seeds = [int.from_bytes(hashlib.sha256(r.tobytes()).digest()[:8], "little") for r in raw.astype(np.float32)]
        return np.stack([np.random.default_rng(s).dirichlet(np.ones(10)) for s in seeds]).astype(np.float32)

    def close(self) -> None:
        self.real.close()


def test_a_noise_teacher_is_never_distillable_whatever_the_strategy(digits_ce_model, tmp_path):
    """The reference is the best label-only student over every strategy's inputs: with answers that carry nothing,
    the augmentation alone (twice the inputs) must not be credited to the teacher. (With `ls` on the rows as the
    only reference, this audit was distillable here: logit-mse@mixup beat it by ~30 points, Holm p ≈ 0.002.)"""
    from audit.runner import AuditSettings, run_audit

    settings = AuditSettings(dataset="digits", out=tmp_path / "r", attacks="kd-T4-a0.9,logit-mse", seeds=5,
                             epochs=2, budget=600, ls_epsilons=(0.1,), ce_reference=False, query_batch=200, jobs=1,
                             threads=1, queries=ALL, progress=False)
    oracle = NoiseOracle(digits_ce_model)
    try:
        report = run_audit(settings, oracle)
    finally:
        oracle.close()
    v = report["verdict"]
    assert set(v["families"]) == {"kd", "logit-mse", "kd@mixup", "logit-mse@mixup", "kd@boundary",
                                  "logit-mse@boundary"}
    assert v["outcome"] != "distillable", v["statement"]
    ref = v["reference"]
    assert set(ref["validation_accuracy"]) == {"ls", "ls@mixup", "ls@boundary"}
    assert ref["family"] == max(ref["validation_accuracy"], key=ref["validation_accuracy"].get)
    base = report["references"][ref["family"]]["accuracy"]
    for name, fam in v["families"].items():  # every family against that one reference, seed by seed
        acc = report["attacks"][name]["accuracy"]
        assert fam["per_seed"] == pytest.approx([100 * (a - b) for a, b in zip(acc, base)])
    assert ref["family"] in v["statement"] or ref["family"] == "ls"


def test_new_flags_are_refused_before_any_query(digits_ce_model, tmp_path, capsys):
    model = ["--model", str(digits_ce_model)]
    assert audit(*model, *SMALL, "--queries", "rows,fgsm", "--out", str(tmp_path / "a")) == 2
    assert "unknown query strategy 'fgsm'; valid names: boundary, mixup, rows" in capsys.readouterr().err
    assert audit(*model, *SMALL, "--queries", "mixup", "--query-rounds", "0", "--out", str(tmp_path / "b")) == 2
    assert "--query-rounds must be a whole number ≥ 1" in capsys.readouterr().err
    tiny = [a if a != "600" else "200" for a in SMALL]  # 200 rows alone would do; not with 3 rounds of mixup
    assert audit(*model, *tiny, "--queries", "mixup", "--query-rounds", "3", "--out", str(tmp_path / "c")) == 2
    assert "once the synthetic queries (mixup) take their share" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abc")
    assert set(QUERIES.names()) == {"rows", "mixup", "boundary"}


def test_a_resumed_audit_never_mixes_two_query_sets(digits_ce_model, tmp_path, capsys):
    """Another --query-rounds, or stored inputs that the recipe no longer regenerates, are refused with the
    cache left as it was."""
    out = tmp_path / "r"
    no_budget = [a for a in SMALL if a not in ("--budget", "600")]  # the same real rows whatever the rounds
    args = ["--model", str(digits_ce_model), *no_budget, "--seeds", "1", "--epochs", "1", "--attacks", "kd-T4-a0.9",
            "--no-ce-reference", "--queries", "rows,boundary", "--out", str(out)]
    assert audit(*args) == 0
    answers = (out / "queries" / "boundary" / "cache" / "answers.npy").read_bytes()
    assert audit(*args, "--query-rounds", "2") == 2
    assert "different audit" in (err := capsys.readouterr().err) and "rounds: cached 1, now 2" in err
    inputs = out / "queries" / "boundary" / "inputs.npy"
    stored = np.load(inputs, mmap_mode="r+")
    stored[-1] = 1 - stored[-1]  # an input of the last adaptive wave that the recipe does not produce
    stored.flush()
    del stored
    assert audit(*args) == 2
    assert "refusing to mix two query sets" in capsys.readouterr().err
    assert (out / "queries" / "boundary" / "cache" / "answers.npy").read_bytes() == answers
