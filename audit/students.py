"""Training the audit's students: one student per task with protect's loop, in this process or in N workers.

A task names a recipe (`Variant`), a seed and the training settings. `train_student` builds the student (the
seed fixes its initial weights, so students of one seed are paired), trains it with `protect.trainer.fit` on
in-memory tensors, keeps the epoch with the best validation accuracy (early stopping), and evaluates the test
split only when the task asks for it (docs/design.md §3: the test split is touched by chosen configurations only).

`run_students` runs tasks one after another (`jobs=1`) or in `jobs` worker processes, each with
`threads` torch threads, or as Ray tasks on a cluster (`ray=RayOptions(...)`, `audit.ray_jobs`). Results come
back as they finish; a worker that dies is reported, replaced, and its student retried once.
"""
from __future__ import annotations

import os
import signal
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from audit.attacks import AttackContext, Variant
from audit.queries.students import training_tensors
from protect.atomic import replace_with
from protect.host import cpu_count

STUDENT_WEIGHTS_DIR = "students"


class StudentFailedError(RuntimeError):
    """A student could not be trained (its error, or a worker that died twice on it)."""


@dataclass
class StudentData:
    """Everything a student needs, as tensors: the transfer rows it trains on, the validation slice that makes
    its choices, the test split, and the sizes to build it."""

    train_x: Tensor  # normalised pixels of the training part of the transfer set
    train_y: Tensor  # true labels (the attacker's labelled transfer set)
    teacher_logp: Tensor  # recovered log-probabilities of the oracle's answers
    labels_logp: Tensor  # one-hot true labels as log-probabilities (label-only controls)
    val_x: Tensor
    val_y: Tensor
    val_teacher_logp: Tensor
    val_labels_logp: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    student: str
    augment: bool = False
    queries: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # per query strategy (audit.queries.students)

    def save(self, path: Path) -> None:
        replace_with(path, lambda tmp: torch.save(asdict(self), tmp))

    @classmethod
    def load(cls, path: Path) -> StudentData:
        return cls(**torch.load(path, map_location="cpu", weights_only=True))


@dataclass(frozen=True)
class StudentTask:
    key: str
    family: str
    variant: Variant
    seed: int
    train: dict  # protect.trainer.TrainConfig fields
    patience: int | None
    evaluate_test: bool = True
    weights: str | None = None  # where to save the best-epoch weights (needed to evaluate the test split later)

    @property
    def label(self) -> str:
        return f"{self.variant.name} seed {self.seed}"


def _device_of(train: dict) -> torch.device:
    from protect.trainer import resolve_device

    return resolve_device(train.get("device", "auto"))


def feature_dims(data: StudentData) -> dict[str, int]:
    from protect.models import create_model

    c, h = data.train_x.shape[1], data.train_x.shape[2]
    return dict(getattr(create_model(data.student, data.num_classes, c, h), "feature_dims", {}))


def build_student(data: StudentData, task: StudentTask):
    """(model, objective) of a task; the model's initial weights depend on the seed alone."""
    from protect.models import create_model

    c, h = data.train_x.shape[1], data.train_x.shape[2]
    dims = feature_dims(data)
    torch.manual_seed(task.seed)  # same initial weights for every recipe at this seed (paired)
    model = create_model(data.student, data.num_classes, c, h)
    control = task.variant.control
    tensors = training_tensors(data, task.variant)
    ctx = AttackContext(num_classes=data.num_classes, feature_dims=dims, teacher_logp=tensors["teacher_logp"],
                        labels=tensors["y"],
                        seed=task.seed, val_logp=data.val_labels_logp if control else data.val_teacher_logp,
                        val_labels=data.val_y)
    return model, task.variant.build(ctx)


def train_student(data: StudentData, task: StudentTask, progress: bool = False) -> dict:
    """Train one student; returns its record (validation accuracy, best epoch, history, test accuracy if asked)."""
    from protect.data import TensorLoader
    from protect.trainer import TrainConfig, accuracy, fit

    cfg = TrainConfig(**task.train)
    device = _device_of(task.train)
    model, objective = build_student(data, task)
    train = TensorLoader(training_tensors(data, task.variant), cfg.batch_size, shuffle=True,
                         seed=task.seed, augment=data.augment, device=device)
    val = TensorLoader({"x": data.val_x, "y": data.val_y}, 1024, shuffle=False, device=device)
    started = time.perf_counter()
    # A patience rule counts only once one-cycle's learning rate is below half its peak (65% of the epochs): before
    # that the validation accuracy swings by points from epoch to epoch.
    after = int(0.65 * cfg.epochs) if cfg.schedule == "onecycle" else 0
    result = fit(model, objective, train, None, cfg, progress=progress, desc=task.label, val_loader=val,
                 patience=task.patience, patience_after=after)
    if result.interrupted:
        raise KeyboardInterrupt
    record = {"key": task.key, "family": task.family, "variant": task.variant.name, "attack": task.variant.attack,
              "control": task.variant.control, "options": objective.options(), "seed": task.seed,
              "val_accuracy": result.best_val_accuracy, "best_epoch": result.best_epoch,
              "epochs_run": len(result.history), "epochs": cfg.epochs, "stopped_early": result.stopped_early,
              "seconds": round(time.perf_counter() - started, 3), "history": result.history}
    if task.evaluate_test:
        test = TensorLoader({"x": data.test_x, "y": data.test_y}, 1024, shuffle=False, device=device)
        record["test_accuracy"] = accuracy(model, test, device)
    if task.weights:
        path = Path(task.weights)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.cpu() for k, v in model.state_dict().items()}
        replace_with(path, lambda tmp: torch.save(state, tmp))
    return record


def test_accuracy_from_weights(data: StudentData, task: StudentTask) -> float:
    """The test accuracy of a student trained earlier, from its saved best-epoch weights."""
    from protect.data import TensorLoader
    from protect.trainer import accuracy

    device = _device_of(task.train)
    model, _ = build_student(data, task)
    model.load_state_dict(torch.load(task.weights, map_location="cpu", weights_only=True))
    model.to(device)
    test = TensorLoader({"x": data.test_x, "y": data.test_y}, 1024, shuffle=False, device=device)
    return accuracy(model, test, device)


def default_jobs(device: str = "auto") -> int:
    """One job per core on a CPU, capped so that every worker has ~1.5 GB of memory; one job on a GPU."""
    if _device_of({"device": device}).type == "cuda":
        return 1
    jobs = cpu_count()
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        jobs = min(jobs, max(1, int(available // 1.5e9)))
    except (ValueError, OSError, AttributeError):
        pass
    return jobs


def default_threads(jobs: int) -> int:
    """cores ÷ jobs, or fewer where OMP_NUM_THREADS asks: more threads than free cores makes every parallel
    region wait for a descheduled thread (measured here: 50× slower steps with one core taken by another job)."""
    threads = max(1, cpu_count() // max(1, jobs))
    try:
        threads = min(threads, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        pass
    return max(1, threads)


@dataclass
class _Worker:
    process: object
    conn: object
    task: StudentTask | None = None


@dataclass
class PoolReport:
    """What happened to the workers: deaths (pid, exit code, the student they were training) and retries."""

    deaths: list[dict] = field(default_factory=list)


def run_students(tasks: Iterable[StudentTask], data: StudentData, on_result: Callable[[dict], list[StudentTask]],
                 *, jobs: int = 1, threads: int | None = None, workdir: Path, progress: bool = True,
                 log: Callable[[str], None] = print, ray=None) -> PoolReport:
    """Train `tasks` (and those `on_result` adds as results come in) with `jobs` processes, or as Ray tasks when
    `ray` (an `audit.ray_jobs.RayOptions`) is given; `on_result` gets each record as soon as it is finished (the
    caller stores it). Ctrl-C stops the workers and re-raises."""
    from tqdm import tqdm

    pending = deque(tasks)
    threads = threads or (max(1, int(ray.student_cpus)) if ray else default_threads(jobs))
    bar = tqdm(total=len(pending), unit="student", desc="students", disable=not progress, dynamic_ncols=True,
               smoothing=0.1)
    report = PoolReport()

    def finished(record: dict) -> None:
        bar.update(1)
        if progress:
            bar.write(f"{record['variant']} seed {record['seed']}: validation {record['val_accuracy']:.4f} "
                      f"(best epoch {record['best_epoch']} of {record['epochs_run']})")
        new = on_result(record)
        pending.extend(new)
        bar.total += len(new)
        bar.refresh()

    try:
        if ray is not None:
            from audit.ray_jobs import run_ray

            run_ray(pending, data, finished, ray, threads, report, log)
        elif jobs <= 1:
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                while pending:
                    finished(_train_or_fail(data, pending.popleft()))
            finally:
                torch.set_num_threads(previous)
        else:
            _run_pool(pending, data, finished, jobs, threads, workdir, report, log)
    finally:
        bar.close()
    return report


def _train_or_fail(data: StudentData, task: StudentTask) -> dict:
    try:
        return train_student(data, task)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        raise StudentFailedError(f"student {task.label} failed: {exc}") from exc


def _run_pool(pending: deque, data: StudentData, finished: Callable[[dict], None], jobs: int, threads: int,
              workdir: Path, report: PoolReport, log: Callable[[str], None]) -> None:
    import multiprocessing as mp
    from multiprocessing.connection import wait

    ctx = mp.get_context("spawn")  # fork after torch has started threads can deadlock
    workdir.mkdir(parents=True, exist_ok=True)
    data_path = workdir / f"data-{os.getpid()}.pt"
    data.save(data_path)
    workers: list[_Worker] = []
    attempts: dict[str, int] = {}

    def start() -> _Worker:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker_main, args=(child, str(data_path), threads), daemon=True)
        proc.start()
        child.close()
        return _Worker(proc, parent)

    try:
        while pending or any(w.task for w in workers):
            while pending and (len(workers) < jobs or any(w.task is None for w in workers)):
                idle = next((w for w in workers if w.task is None), None)
                if idle is None:
                    idle = start()
                    workers.append(idle)
                task = pending.popleft()
                try:
                    idle.conn.send(task)
                    idle.task = task
                except (BrokenPipeError, OSError):  # it died between students: replace it, the task goes first
                    pending.appendleft(task)
                    workers.remove(idle)
                    report.deaths.append({"pid": idle.process.pid, "exit_code": idle.process.exitcode,
                                          "student": None, "retried": False})
                    log(f"worker {idle.process.pid} died between students; starting another")
            busy = [w for w in workers if w.task is not None]
            ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy])
            for w in busy:
                if w.conn in ready or w.conn.poll():
                    try:
                        status, payload = w.conn.recv()
                    except (EOFError, OSError):
                        status, payload = "died", None
                    if status == "ok":
                        w.task = None
                        finished(payload)
                        continue
                    if status == "error":
                        raise StudentFailedError(f"student {w.task.label} failed in worker {w.process.pid}:\n{payload}")
                elif w.process.sentinel not in ready:
                    continue
                # The worker died without an answer (killed, out of memory): report it and retry its student once.
                w.process.join(timeout=5)
                task, code = w.task, w.process.exitcode
                workers.remove(w)
                attempts[task.key] = attempts.get(task.key, 0) + 1
                report.deaths.append({"pid": w.process.pid, "exit_code": code, "student": task.label,
                                      "retried": attempts[task.key] <= 1})
                if attempts[task.key] > 1:
                    raise StudentFailedError(f"worker {w.process.pid} died (exit code {code}) training {task.label}, "
                                             "for the second time; stopped. Finished students are kept.")
                log(f"worker {w.process.pid} died (exit code {code}) while training {task.label}; retrying it once")
                pending.appendleft(task)
    finally:
        for w in workers:
            try:
                w.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        for w in workers:
            w.process.join(timeout=2 if w.task is None else 0)
            if w.process.is_alive():
                w.process.terminate()
                w.process.join(timeout=5)
        data_path.unlink(missing_ok=True)


def _worker_main(conn, data_path: str, threads: int) -> None:
    """A worker: train the tasks the parent sends, one at a time, until it sends None or goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops the workers
    torch.set_num_threads(threads)
    data = StudentData.load(Path(data_path))
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        try:
            message = ("ok", train_student(data, task))
        except Exception:  # noqa: BLE001 - sent to the parent, which stops the audit with it
            message = ("error", traceback.format_exc(limit=8))
        try:
            conn.send(message)
        except (BrokenPipeError, OSError):
            return


__all__ = ["StudentData", "StudentTask", "StudentFailedError", "train_student", "run_students", "default_jobs",
           "default_threads", "test_accuracy_from_weights", "feature_dims"]
