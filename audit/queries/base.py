"""What every query strategy shares: the attacker's material it starts from, the synthetic set it produces, and
the spec the registry holds.

A strategy turns the transfer set's *training* rows (never the validation slice or the test split) into extra
inputs the oracle is asked about. It sends them in waves through `ask` (one call per wave; an adaptive strategy
chooses each wave from the answers to the previous ones), so the answer cache can store them as they arrive and
a resumed audit regenerates the same waves from the cached answers without asking again.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

Ask = Callable[[np.ndarray], np.ndarray]  # raw [0, 1] inputs (n, C, H, W) float32 → answers (n, num_classes)


@dataclass
class QueryContext:
    """The attacker's material: its labelled training rows (raw pixels), the oracle's answers on them, sizes."""

    x: np.ndarray  # (n, C, H, W) float32 raw pixels of the transfer set's training part
    y: np.ndarray  # (n,) int64 true labels
    answers: np.ndarray  # (n, num_classes) the oracle's answers on them (already paid for)
    num_classes: int
    rounds: int  # --query-rounds: each round queries as many synthetic inputs as there are training rows
    seed: int  # fixes every random choice: the same seed and answers give the same queries


@dataclass
class SyntheticSet:
    """A strategy's queries with what students need besides the oracle's answers."""

    x: np.ndarray  # (m, C, H, W) float32 raw pixels, in the order they were asked
    answers: np.ndarray  # (m, num_classes) the oracle's answers
    y: np.ndarray  # (m,) int64 the label the soft families' CE term uses (the dominant label of the recipe)
    label_target: np.ndarray  # (m, num_classes) float32 the label-only reference's target (rows sum to 1)


@dataclass(frozen=True)
class QuerySpec:
    name: str
    summary: str
    synthesise: Callable[[QueryContext, Ask], SyntheticSet] | None  # None: the real rows only (no extra query)
    size: Callable[[int, int], int] = lambda n_train, rounds: 0  # queries asked for n_train rows and k rounds
    recipe: dict = field(default_factory=dict)  # every constant that shapes the queries (in the cache fingerprint)
    adaptive: bool = False  # chooses its queries from the oracle's answers
    reference: str = ""  # how its label-only reference is built (docs, report)


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.eye(num_classes, dtype=np.float32)[labels]
