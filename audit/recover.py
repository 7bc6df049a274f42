"""From the oracle's answers to log-probabilities (docs/design.md §3).

Under the `probs` policy, log p = z − logsumexp(z), so softmax(log p / T) = softmax(z / T) exactly wherever
p > 0. Top-k answers (zeros outside the top k), rounded answers (zeros below the rounding step) and
float underflow leave entries at 0: they are clamped to a floor and counted. The default floor is the smallest
positive value the answers' dtype carries (1.4e-45 for float32), so a strong attacker throws nothing away. Rows are
renormalised after clamping, which changes only each row's additive constant on the log scale. A NaN, an infinity
or a negative value is no probability: it is refused (`AnswersNotProbabilitiesError`), never floored. A label-only
endpoint returns one-hot rows: detected here, so that only attacks that need labels alone are run.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

DEFAULT_FLOOR = None  # the smallest positive value of the answers' dtype


class AnswersNotProbabilitiesError(ValueError):
    """The answers hold non-finite or negative values: no floor can make probabilities of them."""


def dtype_floor(dtype) -> float:
    """The smallest positive value a floating dtype carries (its smallest subnormal); float64's for other dtypes."""
    dtype = np.dtype(dtype)
    return float(np.finfo(dtype if dtype.kind == "f" else np.float64).smallest_subnormal)


@dataclass
class Recovery:
    logp: Tensor  # (N, C) float32 log-probabilities, each row's exp sums to 1
    clamped_entries: int  # entries that were below the floor (zeros included) and set to it
    clamped_rows: int
    label_only: bool  # every row is one-hot: the answers carry the label and nothing else
    floor: float

    def summary(self) -> dict:
        n, c = self.logp.shape
        return {"floor": self.floor, "clamped_entries": self.clamped_entries, "clamped_rows": self.clamped_rows,
                "entries": n * c, "rows": n, "label_only": self.label_only}


def is_one_hot(answers: np.ndarray) -> bool:
    """True if every row has a single non-zero entry (a label-only policy)."""
    a = np.asarray(answers)
    if a.size == 0:
        return False
    return bool(((a > 0).sum(1) == 1).all())


def recover_logp(answers: np.ndarray, floor: float | None = DEFAULT_FLOOR, label_only: bool | None = None) -> Recovery:
    """Probability-like answers (N, C) → log-probabilities with a floor (default: the dtype's smallest positive
    value), and what was clamped."""
    answers = np.asarray(answers)
    floor = dtype_floor(answers.dtype) if floor is None else float(floor)
    if not 0.0 < floor < 1.0:
        raise ValueError(f"floor must be in (0, 1), got {floor}")
    p = np.asarray(answers, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"answers must be (N, C), got shape {p.shape}")
    broken = ~np.isfinite(p) | (p < 0)
    if broken.any():
        row, col = (int(v[0]) for v in np.nonzero(broken))
        raise AnswersNotProbabilitiesError(
            f"{int(broken.sum())} answer entries are non-finite or negative (first: row {row}, class {col}, "
            f"{p[row, col]}); they are no probabilities and are not floored. An oracle's answers are checked as they "
            "arrive; if these come from an answer cache written before those checks, audit into a new --out.")
    bad = p < floor
    p = np.where(bad, floor, p)
    logp = np.log(p)
    logp -= np.logaddexp.reduce(logp, axis=1, keepdims=True) if len(p) else 0.0
    one_hot = is_one_hot(answers) if label_only is None else label_only
    return Recovery(torch.from_numpy(logp.astype(np.float32)), int(bad.sum()), int(bad.any(1).sum()), one_hot, floor)
