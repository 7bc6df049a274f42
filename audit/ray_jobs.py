"""The audit's students as Ray tasks (`audit run --ray [ADDRESS]`): the same students as `--jobs`, on a cluster.

Each student is one task with a resource request (`--student-cpus`, `--student-gpus`; fractional GPUs let several
small students share one GPU). The student tensors (transfer set, teacher answers, validation and test splits) go
to Ray's object store once per driver (`ray.put`) and every task reads them from there. Results come back to the
driver as they finish; the driver alone writes `students.jsonl` and the students' weights, so nothing depends on
a file system shared by the nodes. A task whose worker dies is retried once by Ray (`max_retries=1`); a second
death stops the audit as `--jobs` does. Ray is imported only here, and only when `--ray` is asked for.
"""
from __future__ import annotations

import os
import tempfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from protect.atomic import write_atomic

INSTALL_HINT = "pip install '.[ray]'"


@dataclass(frozen=True)
class RayOptions:
    """Where the students run and what each one asks for."""

    address: str | None = None  # None: start a local cluster; "auto": join the running one; or host:port
    student_cpus: float = 1.0
    student_gpus: float = 0.0


def ray_missing() -> str | None:
    """Why `--ray` cannot run here (Ray is not installed), or None."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return f"--ray needs Ray, an optional extra: {INSTALL_HINT} (or pip install 'ray==2.60.0')"
    return None


def check_options(options: RayOptions, device: str) -> str | None:
    """A usage error in the resource request, or None."""
    if options.student_cpus <= 0 or options.student_gpus < 0:
        return "--student-cpus must be > 0 and --student-gpus ≥ 0 (fractions allowed: 0.25 packs 4 students a GPU)"
    if options.student_gpus > 1 and options.student_gpus != int(options.student_gpus):
        return "--student-gpus above 1 must be a whole number of GPUs"
    if device == "cuda" and options.student_gpus == 0:
        return "--device cuda with --ray needs --student-gpus > 0: a student runs on a GPU Ray gave it, or on the CPU"
    return ray_missing()


_session: dict = {}  # this driver's connection and the object-store copy of the data (one per driver process)


def connect(options: RayOptions) -> dict:
    """Join (or start) the cluster once per driver process; returns its resources."""
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves the machine unless asked
        # "local": a new cluster of this machine, never one that happens to run here already
        ray.init(address=options.address or "local", include_dashboard=False, log_to_driver=False,
                 logging_level="WARNING")
        _session.clear()
    return ray.cluster_resources()


def disconnect() -> None:
    """Drop the data's object-store copy and leave the cluster (a local one started by `connect` stops)."""
    import ray

    _session.clear()
    if ray.is_initialized():
        ray.shutdown()


def _data_ref(data):
    """The data in the object store, put there once per driver and StudentData object (all looks share it)."""
    import ray

    if _session.get("data_id") != id(data):
        _session.update(data_id=id(data), data_ref=ray.put(data), data=data)  # `data` kept: its id stays unique
    return _session["data_ref"]


def _starts_actor():
    """A tiny actor (no CPU) that records which worker process started which student: Ray retries a task whose
    worker died without telling the driver, and this is how the death gets reported."""
    import ray

    if "starts" not in _session:
        @ray.remote(num_cpus=0)
        class Starts:
            def __init__(self):
                self.log: dict[str, list[dict]] = {}

            def started(self, key: str, pid: int, node: str) -> None:
                self.log.setdefault(key, []).append({"pid": pid, "node": node})

            def of(self, key: str) -> list[dict]:
                return self.log.get(key, [])

        _session["starts"] = Starts.remote()
    return _session["starts"]


def train_student_task(data, task, threads: int, starts) -> tuple[dict, bytes | None]:
    """One student on a Ray worker: its record, and its best-epoch weights as bytes when the task keeps them
    (the driver writes them where `task.weights` says)."""
    import ray
    import torch

    from audit.students import train_student

    ray.get(starts.started.remote(task.key, os.getpid(), ray.get_runtime_context().get_node_id()))
    torch.set_num_threads(threads)
    if not ray.get_gpu_ids() and task.train.get("device", "auto") == "auto":
        # Ray leaves the GPUs visible to a task that asked for none: it must not take one it was not given
        task = replace(task, train={**task.train, "device": "cpu"})
    if not task.weights:
        return train_student(data, task), None
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "student.pt"
        record = train_student(data, replace(task, weights=str(local)))
        return record, local.read_bytes()


def _store_weights(path: str, blob: bytes) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, blob)


def run_ray(pending: deque, data, finished: Callable[[dict], None], options: RayOptions, threads: int | None,
            report, log: Callable[[str], None]) -> None:
    """Train `pending` (and what `finished` adds to it) as Ray tasks; `finished` gets each record in the driver."""
    import ray
    from ray.exceptions import RayTaskError

    from audit.students import StudentFailedError

    connect(options)
    threads = threads or max(1, int(options.student_cpus))
    remote = ray.remote(train_student_task).options(num_cpus=options.student_cpus, num_gpus=options.student_gpus,
                                                    max_retries=1, retry_exceptions=False)
    data_ref, starts = _data_ref(data), _starts_actor()
    running: dict = {}  # object ref -> task
    try:
        while pending or running:
            while pending:  # Ray queues what the cluster cannot start yet
                task = pending.popleft()
                running[remote.remote(data_ref, task, threads, starts)] = task
            done, _ = ray.wait(list(running), num_returns=1)
            task = running.pop(done[0])
            try:
                record, blob = ray.get(done[0])
            except RayTaskError as exc:  # the student's own error: the audit stops with it, as with --jobs
                raise StudentFailedError(f"student {task.label} failed on a Ray worker:\n{exc}") from None
            except ray.exceptions.RayError as exc:  # its worker (or node) died twice: Ray's retry is spent
                _report_deaths(report, task, ray.get(starts.of.remote(task.key)), died_last=True)
                raise StudentFailedError(f"the Ray worker died training {task.label}, for the second time; stopped "
                                         f"({type(exc).__name__}). Finished students are kept.") from None
            if blob is not None:
                _store_weights(task.weights, blob)
            for death in _report_deaths(report, task, ray.get(starts.of.remote(task.key)), died_last=False):
                log(f"Ray worker {death['pid']} died while training {task.label}; Ray retried it once")
            finished(record)
    except BaseException:
        for ref in running:  # Ctrl-C or a failed student: stop what is still queued or running
            ray.cancel(ref, force=True)
        raise


def _report_deaths(report, task, attempts: list[dict], died_last: bool) -> list[dict]:
    """Every attempt but the one that answered was a worker that died; the first death is the one Ray retried.
    (Ray does not tell the driver a dead worker's exit code.)"""
    dead = attempts if died_last else attempts[:-1]
    deaths = [{"pid": a["pid"], "exit_code": None, "node": a["node"], "student": task.label, "retried": i == 0}
              for i, a in enumerate(dead)]
    report.deaths.extend(deaths)
    return deaths


__all__ = ["RayOptions", "INSTALL_HINT", "ray_missing", "check_options", "connect", "disconnect", "run_ray"]
