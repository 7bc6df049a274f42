"""The audit's students as Ray tasks (`--ray ADDRESS`) on a real local Ray cluster of 2 CPUs started for the
session: the same students as `--jobs 1`, a killed Ray worker retried by Ray and its student stored once, a
killed driver resumed without retraining finished students, and a clear exit without Ray installed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench.ray_head import LOOPBACK_ENV, start_head
from conftest import ROOT
from test_audit_jobs import BASE, audit, families, trained_keys, wait_for

TASK_TITLE = "ray::train_student_task"  # the process title of a Ray worker while it trains a student
RAY_ENV = LOOPBACK_ENV  # a loopback test cluster: no usage report, no token (whatever ~/.ray holds)


@pytest.fixture(scope="module")
def ray_address():
    """A one-node Ray cluster (2 CPUs, 200 MB object store) for this module, stopped at its end whatever
    happened: the head runs in the foreground (`ray start --block`) in its own process group. Not kept for the
    session: a live Ray node keeps opening loopback ports, and the later tests' servers bind ports too."""
    head = start_head(2, 200 * 1024 ** 2)
    try:
        yield head.address
    finally:
        head.stop()


def ray_audit(model: Path, out: Path, address: str, *extra: str) -> subprocess.Popen:
    """An audit driver joining the cluster, in a process of its own (so that it can be killed)."""
    cmd = [sys.executable, "-m", "audit.cli", "run", "--model", str(model), *BASE, "--out", str(out),
           "--ray", address, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **RAY_ENV, "PYTHONUNBUFFERED": "1"})


def training_workers() -> list[int]:
    """Ray workers training a student right now (the session's cluster is the only one)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _title(int(entry.name)).startswith(TASK_TITLE):
            out.append(int(entry.name))
    return out


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return proc.returncode, err


def test_ray_tasks_give_the_same_students_as_one_job(digits_ce_model, ray_address, tmp_path):
    args = ["--attacks", "kd,hard-label,dkd", "--kd-grid", "quick", "--seeds", "3"]
    assert audit("--model", str(digits_ce_model), *BASE, *args, "--jobs", "1", "--out", str(tmp_path / "one")) == 0
    code, err = finish(ray_audit(digits_ce_model, tmp_path / "ray", ray_address, *args))
    assert code == 0, err
    one, ray = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "ray"))
    assert ray["settings"]["ray"] == {"address": ray_address, "student_cpus": 1.0, "student_gpus": 0.0}
    assert ray["training"]["jobs"] is None and ray["training"]["worker_deaths"] == []
    assert families(one) == families(ray)  # same seeds, same threads: bit for bit
    assert one["verdict"]["families"] == ray["verdict"]["families"]
    assert sorted(trained_keys(tmp_path / "one")) == sorted(trained_keys(tmp_path / "ray"))
    # the candidates' weights came back from the workers: the driver wrote them, one file per candidate kept
    assert sorted(p.name for p in (tmp_path / "ray" / "students").glob("*.pt")) == \
        sorted(p.name for p in (tmp_path / "one" / "students").glob("*.pt"))


def test_a_killed_ray_worker_is_retried_and_its_student_stored_once(digits_ce_model, ray_address, tmp_path):
    out = tmp_path / "r"
    # longer students than elsewhere (1,200 rows, 6 epochs): the worker is killed while it trains one
    proc = ray_audit(digits_ce_model, out, ray_address, "--budget", "1200", "--epochs", "6", "--attacks",
                     "hard-label", "--ls-epsilons", "0.1", "--no-ce-reference", "--seeds", "2")
    try:
        wait_for(lambda: (out / "students.jsonl").exists() and training_workers(), timeout=180,
                 what="a Ray worker training a student")
        victim = training_workers()[0]
        assert _title(victim).startswith(TASK_TITLE)  # still training: read just before the kill
        os.kill(victim, signal.SIGKILL)
    finally:
        code, err = finish(proc)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    deaths = report["training"]["worker_deaths"]
    assert [d["pid"] for d in deaths] == [victim] and deaths[0]["retried"] and deaths[0]["student"]
    assert f"Ray worker {victim} died while training {deaths[0]['student']}; Ray retried it once" in err
    assert report["complete"] and all(len(a) == 2 for a in families(report).values())
    keys = trained_keys(out)
    assert len(keys) == len(set(keys)) == 4  # LS and hard-label at 2 seeds; the retried student stored once


def test_a_killed_driver_resumes_without_retraining(digits_ce_model, ray_address, tmp_path):
    out = tmp_path / "r"
    extra = ["--attacks", "kd,hard-label,vid", "--kd-grid", "quick", "--seeds", "3"]
    proc = ray_audit(digits_ce_model, out, ray_address, *extra)
    try:
        wait_for(lambda: (out / "students.jsonl").exists() and len(trained_keys(out)) >= 4, timeout=180,
                 what="4 students")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    # Ray stops the tasks of a driver that is gone.
    wait_for(lambda: not training_workers(), timeout=120, what="the dead driver's tasks to stop")
    before = trained_keys(out)
    code, err = finish(ray_audit(digits_ce_model, out, ray_address, *extra))
    assert code == 0, err
    after = trained_keys(out)
    assert after[:len(before)] == before and len(after) == len(set(after))  # nothing finished was trained again
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] and all(len(a) == 3 for a in families(report).values())


def test_ray_without_ray_installed_says_how_to_install_it(digits_ce_model, tmp_path):
    code = ("import sys; sys.modules['ray'] = None  # as if Ray were not installed\n"
            "from audit.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "run", "--model", str(digits_ce_model), *BASE, "--ray",
                           "--out", str(tmp_path / "r")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "pip install '.[ray]'" in proc.stderr, proc.stderr
    assert not (tmp_path / "r").exists()  # refused before the first query


def test_ray_refuses_jobs_and_a_gpu_device_without_gpus(digits_ce_model, tmp_path):
    model = ["--model", str(digits_ce_model), *BASE, "--out", str(tmp_path / "r")]
    assert audit(*model, "--ray", "--jobs", "2") == 2
    assert audit(*model, "--ray", "--device", "cuda") == 2
    assert audit(*model, "--ray", "--student-gpus", "1.5") == 2
    assert not (tmp_path / "r").exists()


def test_the_speed_benchmark_compares_ray_with_jobs_and_keeps_the_other_fields(ray_address, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "audit-speed.json").write_text(json.dumps({"vs_bare_loop": 1.15, "targets": {"vs_bare_loop": 0.85}}))
    proc = subprocess.run([sys.executable, "-m", "bench.audit_speed", "--ray-only", "--ray-address", ray_address,
                           "--dataset", "digits", "--rows", "300", "--epochs", "1", "--ray-students", "2",
                           "--ray-rounds", "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **RAY_ENV})
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "audit-speed.json").read_text())
    assert result["vs_bare_loop"] == 1.15 and result["targets"] == {"vs_bare_loop": 0.85, "ray_vs_jobs": 0.9}
    ray = result["ray"]
    assert len(ray["seconds_per_round"]["jobs"]) == len(ray["seconds_per_round"]["ray"]) == len(ray["ratios"]) == 1
    assert result["ray_vs_jobs"] == round(ray["seconds_per_round"]["jobs"][0] / ray["seconds_per_round"]["ray"][0], 3)
    assert result["ray_startup_seconds"] is None  # a cluster it joined: its start-up is not the benchmark's
    assert "--ray-only" in ray["command"] and "ray_vs_jobs" in (out / "audit-speed.md").read_text()
