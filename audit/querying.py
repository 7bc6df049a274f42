"""Asking the endpoint: the transfer set (the dataset's training rows, cut to the query budget), its fixed
validation slice, the oracle's answers (collected into, or resumed from, the answer cache), the synthetic query
sets (`audit.queries`) and the log-probabilities recovered from the answers."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from audit.cache import AnswerCache
from audit.oracle import Oracle, OracleInfo, check_compatible, collect_answers
from audit.queries import rows_for_budget
from audit.queries.collect import collect_queries
from audit.recover import Recovery, recover_logp
from audit.settings import STUDENT_LR, AuditSettings, AuditUsageError, log


@dataclass
class Answers:
    """What the endpoint said about the transfer set, and what the report counts of it."""
    info: OracleInfo
    splits: object  # protect.data.DatasetSplits, cut to the budget
    cache: AnswerCache
    asked: int  # rows asked in this session
    cached_before: int  # rows already answered by an earlier session
    recovery: Recovery
    query_tensors: dict  # per synthetic strategy, the students' tensors (audit.queries.collect)
    query_entries: dict  # per synthetic strategy, what the report and the plan need of it

    @property
    def rows(self) -> int:
        return len(self.splits.train_y)


def validation_split(rows: int, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices) of the transfer set: a fixed, seed-free random slice."""
    n_val = int(round(fraction * rows))
    perm = torch.randperm(rows, generator=torch.Generator().manual_seed(0))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def transfer_set(settings: AuditSettings, strategies: list[str]):
    """The dataset with its training rows cut to what `--budget` leaves for them; fills in the dataset's default
    batch size and the students' learning rate. Refuses a budget that leaves less than one training batch."""
    from protect.data import load_dataset
    from protect.defaults import DATASET_DEFAULTS

    splits = load_dataset(settings.dataset, settings.data_dir)
    defaults = DATASET_DEFAULTS.get(splits.name, DATASET_DEFAULTS["imagefolder"])
    settings.batch_size = settings.batch_size or defaults["batch_size"]
    settings.lr = settings.lr or STUDENT_LR
    n_train = len(splits.train_y)
    if settings.budget is None:
        return splits
    smallest = int(np.ceil(settings.batch_size / (1 - settings.val_fraction))) + 2
    real = rows_for_budget(settings.budget, n_train, strategies, settings.query_rounds, settings.val_fraction)
    if real < smallest:
        shared = f" once the synthetic queries ({', '.join(strategies[1:])}) take their share" \
            if len(strategies) > 1 else ""
        raise AuditUsageError(f"--budget {settings.budget} leaves less than one training batch "
                              f"({settings.batch_size} rows) after the {settings.val_fraction:.0%} validation "
                              f"slice{shared}; ask for at least {smallest} rows (the transfer set has {n_train})")
    return splits.subset_train(real)


def ask(settings: AuditSettings, oracle: Oracle, splits, strategies: list[str]) -> Answers:
    """Check the oracle against the dataset, then collect (or resume) its answers on the transfer rows and on
    each synthetic query set, and recover log-probabilities from the rows' answers."""
    rows = len(splits.train_y)
    info = oracle.metadata()
    check_compatible(info, splits.name, splits.num_classes, splits.input_shape, splits.classes)
    query_batch = min(settings.query_batch, info.max_batch_rows or settings.query_batch)

    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = {"model_sha256": info.model_sha256, "output_policy": info.policy, "dataset": splits.name,
                   "input_shape": splits.input_shape}
    cache = AnswerCache(out, fingerprint, rows, splits.num_classes,
                        allow_unidentified=settings.allow_unidentified_model, source=info.source)
    cached_before = rows - len(cache.missing())
    log(settings, f"oracle {info.source}: {info.num_classes} classes, policy {info.policy.get('kind')}; "
                  f"transfer set {rows} rows of {splits.name} ({cached_before} cached)")
    asked = collect_answers(oracle, cache, splits.train_x.numpy(), query_batch, settings.progress)
    answers = cache.read()
    query_tensors, query_entries = collect_queries(
        strategies, settings.query_rounds, splits, answers, validation_split(rows, settings.val_fraction)[0], oracle,
        out, cache.fingerprint, query_batch, settings.floor, info.label_only, settings.progress)
    recovery = recover_logp(answers, settings.floor, label_only=True if info.label_only else None)
    return Answers(info, splits, cache, asked, cached_before, recovery, query_tensors, query_entries)
