"""What an audit is asked to do (`AuditSettings`), the converged student recipe it defaults to, and the checks that
refuse bad settings before the first query."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from audit.attacks import LS_EPSILONS
from audit.queries import DEFAULT_QUERIES
from audit.ray_jobs import RayOptions
from audit.recover import DEFAULT_FLOOR
from protect.defaults import UsageError

SEED_ROUNDS = (3, 5, 8, 12)  # --seeds auto: the looks, capped by --max-seeds

# The converged student recipe (docs/audit.md, "Converged students"): one-cycle schedule over STUDENT_EPOCHS and
# the best validation epoch kept. No patience rule by default: under one-cycle the validation accuracy swings while
# the learning rate is high and climbs until the last epochs, and a patience of 5 epochs after the peak stopped
# 6 of 24 reference students before the annealing phase (4 to 6 points short).
# 15 epochs of cnn-tiny (lr 0.2) on 9,000 Fashion-MNIST rows is within 0.5 point of a 40-epoch run.
STUDENT_EPOCHS = 15
STUDENT_LR = 0.2
STUDENT_SCHEDULE = "onecycle"
PATIENCE = None
DEFAULT_STUDENT = "cnn-tiny"


AuditUsageError = UsageError  # the one usage error; the old name stays for callers


@dataclass
class AuditSettings:
    dataset: str
    out: Path
    student: str = DEFAULT_STUDENT
    attacks: str = "all"
    seeds: int | str = 5  # paired seeds, or "auto": rounds of SEED_ROUNDS until the outcome is decided
    max_seeds: int = 12
    epochs: int = STUDENT_EPOCHS
    patience: int | None = PATIENCE
    val_fraction: float = 0.1
    selection_seeds: int = 1
    budget: int | None = None
    kd_grid: str = "full"
    queries: str = DEFAULT_QUERIES  # query strategies (audit.queries), comma-separated; rows always included
    query_rounds: int = 1  # each synthetic strategy asks query_rounds × the training rows
    label_controls: bool = False  # also train each soft attack's choice on one-hot true labels (docs/audit.md)
    ls_epsilons: tuple[float, ...] = LS_EPSILONS
    ce_reference: bool = True  # also train a plain CE student on the labels (reported, not part of the verdict)
    data_dir: str | None = None
    lr: float | None = None
    batch_size: int | None = None
    query_batch: int = 1024
    floor: float | None = DEFAULT_FLOOR
    device: str = "auto"
    jobs: int | None = None
    threads: int | None = None
    ray: RayOptions | None = None  # students as Ray tasks on a cluster instead of --jobs worker processes
    references: Path | None = None  # a directory of reference students shared by audits of the same transfer set
    alpha: float = 0.05
    margin: float = 0.3  # points
    progress: bool = True
    command: str = ""
    allow_unidentified_model: bool = False  # cache the answers of an oracle that reports no model sha256

    def training_key(self) -> dict:
        """What makes two students comparable (a student from an earlier session is reused only if equal)."""
        return {"student": self.student, "epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size,
                "floor": self.floor, "patience": self.patience, "schedule": STUDENT_SCHEDULE,
                "val_fraction": self.val_fraction, "selection_seeds": self.selection_seeds}

    def looks(self) -> list[int]:
        """The numbers of seeds at which the outcome is decided: one look for a fixed count."""
        if self.seeds == "auto":
            rounds = [r for r in SEED_ROUNDS if r < self.max_seeds] + [self.max_seeds]
            return sorted(set(r for r in rounds if r >= 2))
        return [int(self.seeds)]


def check_settings(settings: AuditSettings) -> None:
    """Refuse settings that cannot make an audit (AuditUsageError); the budget is checked once the dataset is read."""
    if settings.seeds != "auto" and (not isinstance(settings.seeds, int) or settings.seeds < 1):
        raise AuditUsageError(f"--seeds must be a positive number or 'auto', got {settings.seeds!r}")
    if settings.epochs < 1:
        raise AuditUsageError("--epochs must be ≥ 1")
    if settings.patience is not None and settings.patience < 1:
        raise AuditUsageError("--patience must be ≥ 1 (or 0: no patience rule)")
    if not 0 < settings.val_fraction < 0.5:
        raise AuditUsageError(f"--val-fraction must be in (0, 0.5), got {settings.val_fraction}")
    first = settings.looks()[0]
    if not 1 <= settings.selection_seeds <= first:
        raise AuditUsageError(f"--selection-seeds must be between 1 and the first look's seeds ({first})")
    if settings.seeds == "auto" and settings.max_seeds < 3:
        raise AuditUsageError("--max-seeds must be ≥ 3 with --seeds auto")
    if not 0 < settings.alpha < 1 or settings.margin < 0:
        raise AuditUsageError("--alpha must be in (0, 1) and --margin ≥ 0 points")
    if not isinstance(settings.query_rounds, int) or settings.query_rounds < 1:
        raise AuditUsageError(f"--query-rounds must be a whole number ≥ 1, got {settings.query_rounds!r}")


def log(settings: AuditSettings, message: str) -> None:
    """A progress line on stderr, unless the settings ask for quiet."""
    if settings.progress:
        print(message, file=sys.stderr, flush=True)
