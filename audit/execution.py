"""Running an audit's students: their tensors, the plan (`audit.plan`) with the students trained before, and the
looks: at each one, train what the plan still needs (`audit.students`), store every result as it comes, and let
`audit.stats` decide on the paired Δs."""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from audit.attacks import Variant
from audit.plan import StudentPlan, group_families
from audit.queries.collect import apply_to_plan
from audit.queries.reference import verdict_reference
from audit.querying import Answers, validation_split
from audit.recover import recover_logp
from audit.settings import STUDENT_SCHEDULE, AuditSettings, log
from audit.stats import Verdict, decide
from audit.students import StudentData, StudentTask, default_jobs, run_students, test_accuracy_from_weights

STUDENTS = "students.jsonl"


@dataclass
class Outcome:
    """How the looks ended: the seeds reached, the last decision, and what happened to the workers."""
    seeds: int
    looks: list[int]
    alpha_look: float  # the significance level of each look (alpha split evenly over the looks)
    decision: Verdict | None  # None: interrupted before the first look was decided
    interrupted: bool
    jobs: int | None  # worker processes; None: Ray tasks
    deaths: list[dict]


def student_data(splits, teacher_logp: torch.Tensor, settings: AuditSettings) -> StudentData:
    """The students' tensors: the transfer rows split into training and validation parts, the oracle's answers and
    one-hot labels (for label-only controls) as log-probabilities, and the normalised test split."""
    y = splits.train_y
    train_idx, val_idx = validation_split(len(y), settings.val_fraction)
    labels_logp = recover_logp(np.eye(splits.num_classes, dtype=np.float32)[y.numpy()], settings.floor).logp
    x = splits.normalise(splits.train_x)
    return StudentData(train_x=x[train_idx], train_y=y[train_idx], teacher_logp=teacher_logp[train_idx],
                       labels_logp=labels_logp[train_idx], val_x=x[val_idx], val_y=y[val_idx],
                       val_teacher_logp=teacher_logp[val_idx], val_labels_logp=labels_logp[val_idx],
                       test_x=splits.normalise(splits.test_x), test_y=splits.test_y,
                       num_classes=splits.num_classes, student=settings.student, augment=splits.augment)


def build_plan(settings: AuditSettings, answers: Answers, references: list[Variant], attacks: list[Variant],
               train_rows: int) -> StudentPlan:
    """The plan of students for these settings and answers, with every student trained before loaded."""
    from protect.trainer import TrainConfig

    out = Path(settings.out)
    splits = answers.splits
    train_cfg = asdict(TrainConfig(epochs=settings.epochs, lr=settings.lr, batch_size=settings.batch_size,
                                   schedule=STUDENT_SCHEDULE, device=settings.device))
    identity = {**settings.training_key(), "audit": answers.cache.fingerprint}  # reused only within the same audit
    transfer = {"dataset": splits.name, "rows": answers.rows, "input_shape": splits.input_shape}
    plan = StudentPlan(group_families(references, attacks), identity, train_cfg, settings.patience,
                       settings.selection_seeds, settings.label_controls, out,
                       reference_identity={**settings.training_key(), "transfer": transfer},
                       reference_dir=Path(settings.references) if settings.references else None)
    apply_to_plan(plan, answers.query_entries, settings.epochs, train_rows)
    _open_stores(plan, out)
    return plan


def _read_students(path: Path) -> dict[str, dict]:
    """Records by key; a later line for the same key adds to it (a test accuracy measured after selection)."""
    if not path.exists():
        return {}
    out: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            out.setdefault(rec["key"], {}).update(rec)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by a crash
    return out


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def _open_stores(plan: StudentPlan, out: Path) -> None:
    """Load the students trained before (this audit's store, and the shared references' if any)."""
    stores = {out / STUDENTS} | ({plan.reference_dir / STUDENTS} if plan.reference_dir else set())
    for path in stores:
        path.parent.mkdir(parents=True, exist_ok=True)
        plan.store.update(_read_students(path))
        if path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            with open(path, "a") as fh:  # a line cut short by a kill: start the next one on a line of its own
                fh.write("\n")


def complete(values: list[float | None]) -> list[float] | None:
    """The values if every one is known, else None."""
    return values if values and all(v is not None for v in values) else None


def deltas(plan: StudentPlan, seeds: int) -> dict[str, list[float]]:
    """Each attack family's paired Δ in points (knockoff − the label-only reference's choice, seed by seed), where
    both are complete."""
    reference = verdict_reference(plan)
    ls = complete(plan.accuracies(reference, seeds)) if reference else None
    if ls is None:
        return {}
    out = {}
    for name, fam in plan.families.items():
        acc = complete(plan.accuracies(name, seeds))
        if not fam.reference and acc is not None:
            out[name] = [100 * (a - b) for a, b in zip(acc, ls)]
    return out


class ResultSink:
    """What `run_students` calls with each finished student of one look: store its record, and hand back the tasks
    it makes due (a family's choice, once every candidate is trained at the selection seeds), each once."""

    def __init__(self, plan: StudentPlan, seeds: int, queued: set[str]):
        self.plan, self.seeds, self.queued = plan, seeds, queued

    def __call__(self, record: dict) -> list[StudentTask]:
        _append(self.plan.home(record["family"]) / STUDENTS, record)
        self.plan.store[record["key"]] = record
        fresh = [t for t in self.plan.tasks(self.seeds) if t.key not in self.queued]
        self.queued.update(t.key for t in fresh)
        return fresh


def _test_from_weights(plan: StudentPlan, data: StudentData, seeds: int) -> None:
    """Measure the test accuracy of chosen students kept as weights from the selection seeds."""
    for task in plan.awaiting_test(seeds):
        record = {"key": task.key, "test_accuracy": test_accuracy_from_weights(data, task)}
        _append(plan.home(task.family) / STUDENTS, record)
        plan.store[task.key].update(record)


def run_looks(settings: AuditSettings, plan: StudentPlan, data: StudentData) -> Outcome:
    """Train the plan's students look by look until the outcome is decided, the looks run out, or Ctrl-C."""
    out = Path(settings.out)
    jobs = None if settings.ray else settings.jobs or default_jobs(settings.device)  # None: Ray tasks
    looks = settings.looks()
    alpha_look = settings.alpha / len(looks)
    interrupted, decision, seeds, deaths = False, None, looks[0], []
    for seeds in looks:
        todo = plan.tasks(seeds)
        sink = ResultSink(plan, seeds, {t.key for t in todo})
        log(settings, f"{seeds} paired seeds: {len(todo)} students to train now, "
                      + (f"Ray tasks of {settings.ray.student_cpus:g} CPU" if settings.ray else f"{jobs} job(s)"))
        try:
            pool = run_students(todo, data, sink, jobs=jobs or 1, threads=settings.threads, ray=settings.ray,
                                workdir=out / "students", progress=settings.progress,
                                log=lambda m: print(f"audit: warning: {m}", file=sys.stderr, flush=True))
            deaths += pool.deaths
        except KeyboardInterrupt:
            interrupted = True
            break
        _test_from_weights(plan, data, seeds)
        decision = decide(deltas(plan, seeds), settings.margin, alpha_look)
        log(settings, f"after {seeds} seeds: {decision.outcome} ({decision.reason})")
        if decision.outcome != "inconclusive":
            break
    return Outcome(seeds, looks, alpha_look, decision, interrupted, jobs, deaths)
