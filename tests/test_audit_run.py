"""End-to-end audits on `digits`: over HTTP against a stand-in server, and in-process on exported models.

The stand-in server (`FakeServing`) speaks the serving contract of docs/interfaces.md (`GET /metadata`,
`POST /predict_npy` with .npy bodies, Bearer keys, a row budget answered with 429, output policies) over
real loopback HTTP, and keeps a ledger of every row it answered. It is used until serving's own fixture
exists; the audit's HTTP client is the same either way.
"""
from __future__ import annotations

import hashlib
import io
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import t as t_dist

from audit.cli import main
from audit.oracle import OnnxOracle
from conftest import run_cli

KEY = "k-test"
COMMON = ["--dataset", "digits", "--student", "cnn-tiny", "--seeds", "2", "--epochs", "2", "--budget", "600",
          "--query-batch", "100", "--jobs", "1", "--threads", "1", "--quiet",
          "--queries", "rows"]  # the rows alone: the default adds mixup, tested in test_audit_queries and the README
ATTACKS = ["--attacks", "kd-T4-a0.9,hard-label,vid"]


def row_hash(row: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(row, dtype=np.float32).tobytes()).hexdigest()


class FakeServing:
    def __init__(self, model_dir: Path, policy: dict | None = None, budget: int | None = None,
                 stop_after_requests: int | None = None, metadata_override: dict | None = None, port: int = 0):
        self.oracle = OnnxOracle(model_dir, policy=policy)
        self.policy = self.oracle.policy
        self.budget, self.stop_after = budget, stop_after_requests
        self.ledger: Counter = Counter()
        self.rows_served = 0
        self.requests = 0
        card = self.oracle.card
        self.meta = {"classes": card.classes, "num_classes": card.num_classes, "input_shape": card.input_shape,
                     "normalization": card.normalization.model_dump(), "model_sha256": card.onnx_sha256,
                     "mode": card.mode, "output_policy": self.policy, "max_batch_rows": 4096,
                     **(metadata_override or {})}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, body: bytes, ctype: str, headers: dict | None = None):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _error(self, status, error, detail=""):
                self._send(status, json.dumps({"error": error, "detail": detail}).encode(), "application/json")

            def do_GET(self):
                if self.path == "/metadata":
                    return self._send(200, json.dumps(fake.meta).encode(), "application/json")
                self._error(404, "not found")

            def do_POST(self):
                if fake.stop_after is not None and fake.requests >= fake.stop_after:
                    # Stopping: drop the connection unanswered. The listener closes in a thread after the last
                    # answer, and a request that slips in before it must not be served either.
                    self.close_connection = True
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path != "/predict_npy":
                    return self._error(404, "not found")
                if self.headers.get("Authorization") != f"Bearer {KEY}":
                    return self._error(401, "unauthorized", "unknown API key")
                x = np.load(io.BytesIO(body), allow_pickle=False)
                if fake.budget is not None and fake.rows_served + len(x) > fake.budget:
                    return self._error(429, "budget exhausted", f"{fake.budget} rows per key")
                answers = fake.oracle.query(x)
                fake.rows_served += len(x)
                fake.ledger.update(row_hash(r) for r in x)
                fake.requests += 1
                buf = io.BytesIO()
                np.save(buf, answers.astype(np.float32))
                self._send(200, buf.getvalue(), "application/octet-stream",
                           {"X-Output-Policy": json.dumps(fake.policy)})
                if fake.stop_after is not None and fake.requests >= fake.stop_after:
                    threading.Thread(target=fake.stop, daemon=True).start()

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(model_dir, **kw):
        s = FakeServing(model_dir, **kw)
        servers.append(s)
        return s

    yield start
    for s in servers:
        try:
            s.stop()
        except Exception:
            pass


def transfer_hashes(rows: int) -> Counter:
    from protect.data import load_dataset

    return Counter(row_hash(r) for r in load_dataset("digits").train_x[:rows].numpy())


def audit(*args) -> int:
    return main(["run", *args])


def test_http_audit_of_a_ce_teacher_end_to_end(digits_ce_model, serve, tmp_path, capsys):
    server = serve(digits_ce_model)
    out = tmp_path / "report"
    assert audit("--endpoint", server.url, "--api-key", KEY, *COMMON, *ATTACKS, "--out", str(out)) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["schema_version"] == 2 and report["complete"]
    assert KEY not in json.dumps(report)  # the API key never lands in the report
    q = report["queries"]
    assert q["transfer_rows"] == 600 and q["asked_this_run"] == 600 and q["rows_sent_total"] == 600
    assert server.rows_served == 600 and server.ledger == transfer_hashes(600)  # each row asked exactly once
    assert report["oracle"]["model_sha256"] == json.loads((digits_ce_model / "model.json").read_text())["onnx_sha256"]
    assert set(report["attacks"]) == {"kd", "hard-label", "vid"}
    assert report["attacks"]["kd"]["selected"] == "kd-T4-a0.9"
    ls = report["references"]["ls"]
    for name, entry in report["attacks"].items():
        assert entry["status"] == "ok" and len(entry["accuracy"]) == 2
        d = entry["delta"]
        assert d["per_seed"] == pytest.approx([a - r for a, r in zip(entry["accuracy"], ls["accuracy"])])
    # LS's ε is chosen on the validation slice: the best mean validation accuracy, first named on a tie
    scores = {n: c["validation_accuracy"] for n, c in ls["candidates"].items()}
    assert ls["selected"] == max(scores, key=scores.get) and ls["selected_on"] == "validation"
    assert ls["best_epsilon"] == ls["options"]["epsilon"] and len(report["references"]["ce"]["accuracy"]) == 2
    t = report["training"]
    assert (t["train_rows"], t["val_rows"]) == (540, 60) and t["converged"]["before_plateau"]
    v = report["verdict"]
    assert v["outcome"] in ("distillable", "undistillable", "inconclusive")
    assert v["undistillable"] == {"undistillable": True, "distillable": False}.get(v["outcome"])
    best = max(report["attacks"], key=lambda n: report["attacks"][n]["delta"]["mean"])
    assert v["strongest_attack"] == best and v["best_delta"] == pytest.approx(100 * report["attacks"][best]["delta"]["mean"])
    for name, fam in v["families"].items():  # every family's one-sided 95% bounds, in points
        half = t_dist.ppf(0.95, 1) * fam["std"] / np.sqrt(2)
        assert fam["per_seed"] == pytest.approx([100 * x for x in report["attacks"][name]["delta"]["per_seed"]])
        assert fam["upper"] == pytest.approx(fam["mean"] + half) and fam["lower"] == pytest.approx(fam["mean"] - half)
    assert {t["attack"] for t in v["not_tried"]} == {"logit-mse", "logit-std", "dkd", "skeptical", "calibrated-kd",
                                                     "mimkd"}
    # the soft attacks against the teacher's own labels (hard-label), seed by seed
    b, hard = v["beyond_labels"], report["attacks"]["hard-label"]["accuracy"]
    expected = {n: float(np.mean([a - h for a, h in zip(report["attacks"][n]["accuracy"], hard)]))
                for n in ("kd", "vid")}
    assert b["reference"] == "hard-label" and b["per_attack"] == pytest.approx(expected)
    assert b["strongest_attack"] == max(expected, key=expected.get) and b["best_delta"] == pytest.approx(max(expected.values()))
    md = (out / "report.md").read_text()
    assert "Beyond the teacher's labels" in md and v["statement"] in md and "Choices made on the validation slice" in md
    assert set(report["teacher"]["cmi"]) == {"1", "2", "4", "8", "16", "32"}
    assert "data:image/png;base64," in (out / "report.html").read_text()
    students = (out / "students.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in students]
    trained = [r for r in records if "val_accuracy" in r]
    assert len(trained) == len({r["key"] for r in trained}) == (3 + 1 + 3) + (1 + 1 + 3)  # seed 0: every candidate
    # The test split is touched by chosen students only: the LS candidates not chosen have no test accuracy.
    tested = {r["key"] for r in records if r.get("test_accuracy") is not None}
    unchosen = {r["key"] for r in trained if r["family"] == "ls" and r["variant"] != ls["selected"]}
    assert len(unchosen) == 2 and not unchosen & tested and len(tested) == 2 * 5

    # The same command again: nothing is asked and no student is retrained.
    assert audit("--endpoint", server.url, "--api-key", KEY, *COMMON, *ATTACKS, "--out", str(out)) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["queries"]["asked_this_run"] == 0 and server.rows_served == 600
    assert (out / "students.jsonl").read_text().splitlines() == students
    assert again["attacks"]["vid"]["accuracy"] == report["attacks"]["vid"]["accuracy"]
    assert again["verdict"]["families"] == report["verdict"]["families"]

    assert main(["report", str(out), "--quiet"]) == 0
    assert "report.html" in capsys.readouterr().out


def test_resume_after_the_server_stops_mid_audit_asks_no_row_twice(digits_ce_model, serve, tmp_path, capsys):
    first = serve(digits_ce_model, stop_after_requests=2)
    port = first.server.server_address[1]
    out = tmp_path / "report"
    args = ["--endpoint", first.url, "--api-key", KEY, *COMMON, "--attacks", "hard-label", "--retries", "1",
            "--out", str(out)]
    assert audit(*args) == 1
    err = capsys.readouterr().err
    assert "cannot connect" in err and "kept" in err
    assert int(np.load(out / "cache" / "have.npy").sum()) == 200
    second = serve(digits_ce_model, port=port)  # the server comes back on the same address
    second.ledger.update(first.ledger)
    assert audit(*args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["queries"]["asked_this_run"] == 400 and report["queries"]["cached_before_this_run"] == 200
    assert report["queries"]["rows_sent_total"] == 600 and report["queries"]["sessions"] == 2
    assert second.ledger == transfer_hashes(600)  # over both servers' lives, each row once


def test_a_budget_exhausted_key_is_a_clear_error_with_the_answers_kept(digits_ce_model, serve, tmp_path, capsys):
    server = serve(digits_ce_model, budget=300)
    out = tmp_path / "report"
    code = audit("--endpoint", server.url, "--api-key", KEY, *COMMON, "--attacks", "hard-label", "--retries", "1",
                 "--out", str(out))
    assert code == 1
    err = capsys.readouterr().err
    assert "429" in err and "budget exhausted" in err and "rerun the same command" in err
    assert int(np.load(out / "cache" / "have.npy").sum()) == 300 == server.rows_served


def test_wrong_key_stops_at_once(digits_ce_model, serve, tmp_path, capsys):
    server = serve(digits_ce_model)
    code = audit("--endpoint", server.url, "--api-key", "wrong", *COMMON, "--attacks", "hard-label",
                 "--out", str(tmp_path / "r"))
    assert code == 1
    assert "API key" in capsys.readouterr().err and server.rows_served == 0


def test_unreachable_endpoint(tmp_path, capsys):
    code = audit("--endpoint", "http://127.0.0.1:9", "--retries", "0", *COMMON, "--attacks", "hard-label",
                 "--out", str(tmp_path / "r"))
    assert code == 1 and "cannot connect to http://127.0.0.1:9" in capsys.readouterr().err


def test_model_that_does_not_fit_the_dataset_is_refused_before_any_query(digits_ce_model, serve, tmp_path, capsys):
    server = serve(digits_ce_model, metadata_override={"input_shape": [1, 28, 28]})
    code = audit("--endpoint", server.url, "--api-key", KEY, *COMMON, "--out", str(tmp_path / "r"))
    assert code == 2
    assert "does not fit --dataset digits" in capsys.readouterr().err and server.rows_served == 0


def test_unknown_attack_and_tiny_budget_are_refused_before_any_query(digits_ce_model, serve, tmp_path, capsys):
    server = serve(digits_ce_model)
    assert audit("--endpoint", server.url, "--api-key", KEY, *COMMON, "--attacks", "kd,fgsm",
                 "--out", str(tmp_path / "a")) == 2
    assert "unknown attack 'fgsm'; valid names: calibrated-kd, dkd, hard-label, kd" in capsys.readouterr().err
    args = [a if a != "600" else "10" for a in COMMON]
    assert audit("--endpoint", server.url, "--api-key", KEY, *args, "--out", str(tmp_path / "b")) == 2
    assert "leaves less than one training batch" in capsys.readouterr().err
    assert server.rows_served == 0 and not (tmp_path / "a" / "cache").exists()


def test_label_only_endpoint_runs_only_label_attacks(digits_ce_model, serve, tmp_path):
    server = serve(digits_ce_model, policy={"kind": "label", "k": None, "decimals": None})
    out = tmp_path / "r"
    assert audit("--endpoint", server.url, "--api-key", KEY, *COMMON, *ATTACKS, "--out", str(out)) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["recovery"]["label_only"]
    assert report["attacks"]["hard-label"]["status"] == "ok"
    assert report["attacks"]["vid"]["status"] == "not run" and "labels only" in report["attacks"]["vid"]["reason"]
    assert {"kd", "vid"} <= {t["attack"] for t in report["verdict"]["not_tried"]}
    assert report["verdict"]["beyond_labels"] is None  # no soft attack could run
    assert report["teacher"]["cmi"] == {} and "not measurable" in report["teacher"]["cmi_note"]


def test_topk_endpoint_counts_clamped_entries(digits_ce_model, serve, tmp_path):
    server = serve(digits_ce_model, policy={"kind": "topk", "k": 2, "decimals": None})
    out = tmp_path / "r"
    assert audit("--endpoint", server.url, "--api-key", KEY, *COMMON, "--attacks", "kd-T4-a0.9",
                 "--out", str(out)) == 0
    rec = json.loads((out / "report.json").read_text())["recovery"]
    assert rec["clamped_entries"] >= 600 * 8 and not rec["label_only"]  # at least the 8 zeros of every row


def test_in_process_audit_of_a_cmim_teacher_and_refusal_to_mix_caches(digits_cmim_model, digits_ce_model, tmp_path,
                                                                       capsys):
    out = tmp_path / "r"
    args = [*COMMON, "--attacks", "kd-T4-a0.9,logit-std,dkd,skeptical,calibrated-kd,mimkd,logit-mse", "--seeds", "1"]
    assert audit("--model", str(digits_cmim_model / "model"), *args, "--out", str(out)) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["oracle"]["mode"] == "cmim" and report["queries"]["asked_this_run"] == 600
    assert all(e["status"] == "ok" for e in report["attacks"].values())
    v = report["verdict"]  # one seed gives no spread: no test can decide
    assert v["outcome"] == "inconclusive" and v["undistillable"] is None and "at least 3 paired seeds" in v["statement"]
    before = (out / "cache" / "answers.npy").read_bytes()
    assert audit("--model", str(digits_ce_model), *args, "--out", str(out)) == 2
    assert "different audit" in capsys.readouterr().err
    assert (out / "cache" / "answers.npy").read_bytes() == before


def test_audits_of_two_teachers_share_their_reference_students(digits_ce_model, digits_cmim_model, tmp_path):
    refs = tmp_path / "references"
    args = [*COMMON, "--attacks", "hard-label", "--references", str(refs)]
    assert audit("--model", str(digits_ce_model), *args, "--out", str(tmp_path / "ce")) == 0
    shared = (refs / "students.jsonl").read_text()
    assert audit("--model", str(digits_cmim_model / "model"), *args, "--out", str(tmp_path / "cmim")) == 0
    assert (refs / "students.jsonl").read_text() == shared  # nothing trained again
    ce, cmim = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("ce", "cmim"))
    assert ce["references"]["ls"]["accuracy"] == cmim["references"]["ls"]["accuracy"]
    assert ce["references"]["ce"]["accuracy"] == cmim["references"]["ce"]["accuracy"]
    for d in ("ce", "cmim"):  # each audit's own store holds its attacks only
        assert {json.loads(line)["family"] for line in (tmp_path / d / "students.jsonl").read_text().splitlines()} \
            == {"hard-label"}


def test_attacks_lists_the_battery(capsys):
    assert main(["attacks"]) == 0
    text = capsys.readouterr().out
    for name in ("kd", "hard-label", "logit-mse", "logit-std", "dkd", "skeptical", "calibrated-kd", "vid", "mimkd"):
        assert f"\n{name} " in "\n" + text


# ------------------------------------------------------------------ against a real `bentoml serve` (serving/)

def keys_cli(db: Path, *args: str) -> str:
    import subprocess
    import sys

    from serving_server import ROOT

    proc = subprocess.run([sys.executable, "-m", "serving.keys", "--db", str(db), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def served_rows(db: Path) -> dict[str, int]:
    return {k["name"]: k["rows_served"] for k in json.loads(keys_cli(db, "list", "--json"))}


def bento(model_dir: Path, tmp: Path):
    from serving_server import Server

    return Server({"UNDISTILLABLE_MODEL_DIR": str(model_dir), "UNDISTILLABLE_KEYS_DB": str(tmp / "keys.sqlite")},
                  tmp / "serve.log")


def test_bentoml_ce_teacher_budget_outage_and_resume_ask_no_row_twice(digits_ce_model, tmp_path, capsys):
    """A key's budget runs out mid-audit (429), the server goes down (connection refused), comes back on another
    port, and the audit finishes with a second key: the server's ledger shows each transfer row served once."""
    db = tmp_path / "keys.sqlite"
    small = keys_cli(db, "add", "auditor-1", "--budget", "300").strip()
    big = keys_cli(db, "add", "auditor-2").strip()
    server = bento(digits_ce_model, tmp_path).start()
    out = tmp_path / "report"
    args = [*COMMON, "--attacks", "kd-T4-a0.9,vid", "--seeds", "1", "--retries", "1", "--out", str(out)]
    try:
        assert audit("--endpoint", server.url, "--api-key", small, *args) == 1
        err = capsys.readouterr().err
        assert "429" in err and "over_budget" in err and "kept" in err
        assert int(np.load(out / "cache" / "have.npy").sum()) == 300
        url = server.url
    finally:
        server.stop()
    assert audit("--endpoint", url, "--api-key", big, *args) == 1  # the server is down
    assert "cannot connect" in capsys.readouterr().err
    server = bento(digits_ce_model, tmp_path).start()
    try:
        assert audit("--endpoint", server.url, "--api-key", big, *args) == 0
    finally:
        server.stop()
    report = json.loads((out / "report.json").read_text())
    q = report["queries"]
    assert (q["transfer_rows"], q["asked_this_run"], q["cached_before_this_run"]) == (600, 300, 300)
    assert served_rows(db) == {"auditor-1": 300, "auditor-2": 300}  # 600 rows in all: each asked once
    digests = [b["digest"] for name in ("auditor-1", "auditor-2")
               for b in json.loads(keys_cli(db, "ledger", name, "--json"))]
    assert len(digests) == 6 == len(set(digests))  # six distinct batches of 100 rows
    assert report["oracle"]["model_sha256"] == json.loads((digits_ce_model / "model.json").read_text())["onnx_sha256"]
    assert report["complete"] and report["verdict"]["outcome"] == "inconclusive"  # one seed
    assert report["verdict"]["beyond_labels"] is None  # no hard-label student to compare with
    assert set(report["teacher"]["cmi"]) == {"1", "2", "4", "8", "16", "32"}
    assert "data:image/png;base64," in (out / "report.html").read_text()


def test_bentoml_cmim_teacher_end_to_end(digits_cmim_model, tmp_path):
    db = tmp_path / "keys.sqlite"
    key = keys_cli(db, "add", "auditor").strip()
    server = bento(digits_cmim_model / "model", tmp_path).start()
    out = tmp_path / "report"
    try:
        assert audit("--endpoint", server.url, "--api-key", key, *COMMON, "--attacks", "kd-T4-a0.9,hard-label",
                     "--out", str(out)) == 0
    finally:
        server.stop()
    report = json.loads((out / "report.json").read_text())
    assert report["oracle"]["mode"] == "cmim" and report["queries"]["asked_this_run"] == 600
    assert served_rows(db) == {"auditor": 600}
    for entry in report["attacks"].values():
        assert entry["status"] == "ok" and len(entry["delta"]["per_seed"]) == 2
    v = report["verdict"]
    assert v["outcome"] in ("distillable", "undistillable", "inconclusive") and v["strongest_attack"] in report["attacks"]
    assert set(v["families"]) == {"kd", "hard-label"} and all(f["upper"] is not None for f in v["families"].values())


def test_label_controls_train_each_soft_attack_on_the_labels_alone(digits_ce_model, tmp_path):
    out = tmp_path / "r"
    assert audit("--model", str(digits_ce_model), *COMMON, "--attacks", "logit-std,hard-label", "--label-controls",
                 "--out", str(out)) == 0
    report = json.loads((out / "report.json").read_text())
    entry = report["attacks"]["logit-std"]
    control = entry["label_control"]
    assert control["delta"]["per_seed"] == pytest.approx([a - c for a, c in zip(entry["accuracy"], control["accuracy"])])
    assert "label_control" not in report["attacks"]["hard-label"]  # its control would be the CE student
    trained = [json.loads(line).get("variant") for line in (out / "students.jsonl").read_text().splitlines()]
    assert trained.count("logit-std@labels") == 2 and "hard-label@labels" not in trained
    assert "Label-only controls" in (out / "report.md").read_text()
