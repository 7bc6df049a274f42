"""The audit's students in worker processes (`--jobs`): same results as one process, a killed worker retried,
a killed audit resumed without retraining finished students; `--seeds auto` adds seeds in rounds."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from audit.cli import main
from conftest import ROOT

BASE = ["--dataset", "digits", "--budget", "600", "--epochs", "3", "--threads", "1", "--quiet",
        "--queries", "rows"]  # the rows alone: these tests are about the jobs, not the query strategies


def audit(*args) -> int:
    return main(["run", *args])


def families(report: dict) -> dict[str, list[float]]:
    return {n: e["accuracy"] for n, e in {**report["references"], **report["attacks"]}.items()}


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "students.jsonl").read_text().splitlines() if line.strip()]


def trained_keys(out: Path) -> list[str]:
    return [r["key"] for r in records(out) if "val_accuracy" in r]


def spawn(model: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "audit.cli", "run", "--model", str(model), *BASE, "--out", str(out), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def workers_of(pid: int) -> list[int]:
    """The audit's student workers: its children started by multiprocessing's spawn (not its resource tracker)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and "spawn_main" in cmdline:
            out.append(int(entry.name))
    return out


def wait_for(condition, timeout: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_two_jobs_give_the_same_students_as_one(digits_ce_model, tmp_path):
    args = ["--model", str(digits_ce_model), *BASE, "--attacks", "kd,hard-label,dkd", "--kd-grid", "quick",
            "--seeds", "3"]
    assert audit(*args, "--jobs", "1", "--out", str(tmp_path / "one")) == 0
    assert audit(*args, "--jobs", "2", "--out", str(tmp_path / "two")) == 0
    one, two = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert two["training"]["jobs"] == 2 and one["training"]["jobs"] == 1
    assert families(one) == families(two)  # same seeds, same threads: bit for bit
    assert one["verdict"]["families"] == two["verdict"]["families"]
    assert sorted(trained_keys(tmp_path / "one")) == sorted(trained_keys(tmp_path / "two"))


def test_a_killed_worker_is_reported_and_its_student_retried(digits_ce_model, tmp_path):
    out = tmp_path / "r"
    proc = spawn(digits_ce_model, out, "--jobs", "2", "--attacks", "kd,hard-label", "--kd-grid", "quick",
                 "--seeds", "3")
    try:
        wait_for(lambda: (out / "students.jsonl").exists() and len(workers_of(proc.pid)) == 2, what="two workers")
        victim = workers_of(proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    report = json.loads((out / "report.json").read_text())
    deaths = report["training"]["worker_deaths"]
    assert [d["pid"] for d in deaths] == [victim] and deaths[0]["exit_code"] == -signal.SIGKILL
    assert report["complete"] and report["verdict"]["outcome"] is not None
    keys = trained_keys(out)
    assert len(keys) == len(set(keys))  # the retried student was stored once
    if deaths[0]["student"]:  # it was training one (not between two): retried once, said so
        assert deaths[0]["retried"] and "retrying it once" in err


def test_an_audit_killed_mid_way_resumes_without_retraining(digits_ce_model, tmp_path):
    out = tmp_path / "r"
    extra = ["--jobs", "2", "--attacks", "kd,hard-label,vid", "--kd-grid", "quick", "--seeds", "3"]
    proc = spawn(digits_ce_model, out, *extra)
    try:
        wait_for(lambda: (out / "students.jsonl").exists() and len(trained_keys(out)) >= 4, what="4 students")
        workers = workers_of(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    # Orphaned workers notice their parent is gone and exit.
    wait_for(lambda: not any(Path(f"/proc/{w}").exists() and "Z" not in Path(f"/proc/{w}/stat").read_text()
                             for w in workers), timeout=120, what="orphaned workers to exit")
    before = trained_keys(out)
    assert audit("--model", str(digits_ce_model), *BASE, *extra, "--out", str(out)) == 0
    after = trained_keys(out)
    assert after[:len(before)] == before and len(after) == len(set(after))  # nothing finished was trained again
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] and all(len(a) == 3 for a in families(report).values())


def test_seeds_auto_adds_seeds_in_rounds_and_splits_alpha(digits_ce_model, tmp_path):
    out = tmp_path / "r"
    assert audit("--model", str(digits_ce_model), *BASE, "--attacks", "hard-label,kd-T4-a0.9", "--ls-epsilons", "0.1",
                 "--no-ce-reference", "--seeds", "auto", "--max-seeds", "5", "--jobs", "1", "--out", str(out)) == 0
    report = json.loads((out / "report.json").read_text())
    v = report["verdict"]
    assert v["looks"] == [3, 5] and v["alpha_per_look"] == 0.025
    assert v["seeds"] in (3, 5) and (v["seeds"] == 5 or v["outcome"] != "inconclusive")
    assert all(len(a) == v["seeds"] for a in families(report).values())
    assert "ce" not in report["references"]
    assert len(trained_keys(out)) == 3 * v["seeds"]  # LS, hard-label, kd at each seed
