"""The audit's students as Ray tasks (`--ray ADDRESS`) on a real local Ray cluster of 2 CPUs started for the
session: the same students as `--jobs 1`, a killed Ray worker retried by Ray and its student stored once, a
killed driver resumed without retraining finished students, and a clear exit without Ray installed."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ROOT
from test_audit_jobs import BASE, audit, families, trained_keys, wait_for

TASK_TITLE = "ray::train_student_task"  # the process title of a Ray worker while it trains a student
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_address():
    """A one-node Ray cluster (2 CPUs, 200 MB object store) for the session; stopped at the end, whatever
    happened: the head runs in the foreground (`ray start --block`) in its own process group."""
    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    log = open(Path(temp) / "head.log", "w")
    head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                             "--num-cpus", "2", "--port", str(port), "--node-ip-address", "127.0.0.1",
                             "--disable-usage-stats", "--include-dashboard=false",
                             "--object-store-memory", str(200 * 1024 ** 2), "--temp-dir", temp],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **RAY_ENV})
    try:
        wait_for(lambda: head.poll() is not None or "block forever" in (Path(temp) / "head.log").read_text(),
                 timeout=120, what="the Ray head to start")
        assert head.poll() is None, (Path(temp) / "head.log").read_text()
        yield f"127.0.0.1:{port}"
    finally:
        head.send_signal(signal.SIGTERM)  # the head stops its raylet, which stops the workers
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # anything of its group left behind
        except ProcessLookupError:
            pass
        head.wait()
        log.close()


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
