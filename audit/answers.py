"""What an oracle's answer must be before it is cached (docs/audit.md, "What the client checks").

An answer to n rows is a float32 or float64 array of shape (n, classes), finite, in [0, 1], and consistent with
the output policy the endpoint declared in /metadata (docs/interfaces.md):

  probs   each row sums to 1 within 1e-4, or within 10^-decimals × classes when the policy rounds
  topk    at most k non-zero entries per row; each row sums to at most 1 and at least min(k, classes) / classes
          (the least that the k largest entries of a distribution hold), with the same tolerance
  label   one-hot rows: one entry exactly 1, the others 0

Anything else is an `OracleAnswerError` naming the endpoint and the first bad row. Nothing is repaired: a NaN,
a negative value or an unnormalised row says the endpoint is broken or is not serving the policy it declares,
and flooring it would hand the students answers no model gave.
"""
from __future__ import annotations

import numpy as np

from audit.errors import OracleAnswerError, OracleError

POLICY_KINDS = ("probs", "topk", "label")
SUM_TOLERANCE = 1e-4  # unrounded float32 probabilities sum to 1 within ~1e-6; 1e-4 leaves room for any softmax
ENTRY_SLACK = 1e-6  # an entry may exceed 1 by a float32 rounding of the softmax's division, not more
ACCEPTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _is_int(value) -> bool:
    return type(value) is int  # not bool: True is an int to isinstance


def parse_policy(declared, source: str) -> dict:
    """The output policy an endpoint declares (`output_policy` in /metadata), checked: {"kind", "k", "decimals"}.
    None means full probabilities (an endpoint that declares nothing)."""
    if declared is None:
        return {"kind": "probs", "k": None, "decimals": None}
    if not isinstance(declared, dict):
        raise OracleError(f"{source} declares output_policy {declared!r}, not an object like "
                          '{"kind": "probs", "k": null, "decimals": null}')
    kind, k, decimals = declared.get("kind", "probs"), declared.get("k"), declared.get("decimals")
    problems = []
    if kind not in POLICY_KINDS:
        problems.append(f"kind {kind!r} (the audit knows {', '.join(POLICY_KINDS)})")
    if kind == "topk" and not (_is_int(k) and k >= 1):
        problems.append(f"topk with k={k!r} (k must be a whole number ≥ 1)")
    if decimals is not None and not (_is_int(decimals) and decimals >= 0):
        problems.append(f"decimals={decimals!r} (a whole number ≥ 0, or null)")
    if problems:
        raise OracleError(f"{source} declares an output policy the audit cannot check answers against: "
                          + "; ".join(problems) + ". Nothing was queried.")
    return {"kind": kind, "k": k, "decimals": decimals}


def sum_tolerance(policy: dict, classes: int) -> float:
    """How far a row's sum may stray from what the policy promises: 1e-4, or 10^-decimals per entry."""
    decimals = policy.get("decimals")
    return SUM_TOLERANCE if decimals is None else 10.0 ** -int(decimals) * classes


def check_dtype_shape(dtype: np.dtype, shape: tuple, rows: int, classes: int, source: str) -> None:
    """Refuse an answer that is not a (rows, classes) float32/float64 array, before anything is allocated for it."""
    dtype = np.dtype(dtype)
    if dtype.names is not None or dtype.subdtype is not None or dtype.newbyteorder("=") not in ACCEPTED_DTYPES:
        raise OracleAnswerError(f"{source} answered an array of dtype {dtype.str!r} ({dtype}); probabilities must "
                                "be float32 or float64. The endpoint is not an undistillable server, or is broken; "
                                "nothing of this batch was cached.")
    if type(shape) is not tuple or not all(_is_int(d) for d in shape) or shape != (rows, classes):
        raise OracleAnswerError(f"{source} answered shape {shape!r}, expected {(rows, classes)} ({rows} rows sent, "
                                f"{classes} classes in /metadata); nothing of this batch was cached.")


def _row_problems(a: np.ndarray, i: int, policy: dict, tol: float) -> list[str]:
    """Everything wrong with row i, in words."""
    row, classes = a[i], a.shape[1]
    out = []
    bad = np.flatnonzero(~np.isfinite(row))
    if len(bad):
        out.append(f"entry {bad[0]} is {row[bad[0]]} (non-finite)")
        return out  # sums of a non-finite row say nothing more
    neg = np.flatnonzero(row < 0)
    if len(neg):
        out.append(f"entry {neg[0]} is {row[neg[0]]:.6g} (negative)")
    big = np.flatnonzero(row > 1 + ENTRY_SLACK)
    if len(big):
        out.append(f"entry {big[0]} is {row[big[0]]:.6g} (above 1)")
    total, nonzero, kind = float(row.sum()), int((row != 0).sum()), policy["kind"]
    if kind == "probs" and abs(total - 1) > tol:
        out.append(f"sums to {total:.6g} (a probability row sums to 1 within {tol:g})")
    elif kind == "topk":
        k = min(int(policy["k"]), classes)
        if nonzero > k:
            out.append(f"has {nonzero} non-zero entries (top-k with k={policy['k']} allows at most {k})")
        if total > 1 + tol or total < k / classes - tol:
            out.append(f"sums to {total:.6g} (the top {k} of {classes} probabilities sum to between "
                       f"{k / classes:.4g} and 1, within {tol:g})")
    elif kind == "label" and not (nonzero == 1 and float(row.max()) == 1.0):
        out.append(f"is not one-hot ({nonzero} non-zero entries, largest {float(row.max()):.6g})")
    return out


def check_answers(answers: np.ndarray, rows: int, classes: int, policy: dict, source: str) -> np.ndarray:
    """The answers as float32 if they are what `policy` promises for `rows` rows of `classes` classes; otherwise an
    OracleAnswerError naming `source`, the first bad row (its index in this batch) and what is wrong with it."""
    a = np.asarray(answers)
    check_dtype_shape(a.dtype, a.shape, rows, classes, source)
    a = a.astype(np.float64)
    tol = sum_tolerance(policy, classes)
    finite = np.isfinite(a).all(1)
    clean = np.where(np.isfinite(a), a, 0.0)
    bad = ~finite | (clean < 0).any(1) | (clean > 1 + ENTRY_SLACK).any(1)
    total, nonzero, kind = clean.sum(1), (clean != 0).sum(1), policy["kind"]
    if kind == "probs":
        bad |= np.abs(total - 1) > tol
    elif kind == "topk":
        k = min(int(policy["k"]), classes)
        bad |= (nonzero > k) | (total > 1 + tol) | (total < k / classes - tol)
    elif kind == "label":
        bad |= (nonzero != 1) | (clean.max(1, initial=0.0) != 1.0)
    else:
        raise OracleError(f"unknown output policy {policy!r}")  # parse_policy lets none through
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise OracleAnswerError(
            f"{source} answered {int(bad.sum())} of {rows} rows that break its declared output policy {policy}: "
            f"row {first} of the batch: " + "; ".join(_row_problems(a, first, policy, tol))
            + ". Nothing is repaired and nothing of this batch was cached: the endpoint is broken or does not "
            "serve the policy its /metadata declares.", row=first)
    return a.astype(np.float32)
