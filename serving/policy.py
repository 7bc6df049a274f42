"""Output policies: what the API reveals of the model's probabilities (docs/design.md §5, docs/interfaces.md)."""
from __future__ import annotations

import numpy as np

from serving.config import OutputPolicy


def _order(probs: np.ndarray) -> np.ndarray:
    """Classes by decreasing probability, ties broken by class index (deterministic)."""
    return np.argsort(-probs, axis=1, kind="stable")


def reveal(probs: np.ndarray, kind: str, k: int | None = None, decimals: int | None = None) -> np.ndarray:
    """(N, C) float32 as /predict_npy answers it: probabilities (`probs`); the top k with the rest 0 (`topk`); or
    one-hot labels (`label`). Rounded to `decimals` when set (rounded rows need not sum exactly to 1). The one
    definition of the output policy: the service answers with it and the audit's in-process oracle simulates it."""
    probs = np.asarray(probs, dtype=np.float32)
    if kind == "label":
        out = np.zeros_like(probs)
        out[np.arange(len(probs)), _order(probs)[:, 0]] = 1.0
        return out
    if kind == "topk":
        out = np.zeros_like(probs)
        keep = _order(probs)[:, :k]
        rows = np.arange(len(probs))[:, None]
        out[rows, keep] = probs[rows, keep]
    elif kind == "probs":
        out = probs.copy()
    else:
        raise ValueError(f"unknown output policy {kind!r}")
    if decimals is not None:
        out = np.round(out, decimals).astype(np.float32)
    return out


def apply_array(probs: np.ndarray, policy: OutputPolicy) -> np.ndarray:
    """`reveal` under the service's configured policy."""
    return reveal(probs, policy.kind, policy.k, policy.decimals)


def _round(value: float, decimals: int | None) -> float:
    return round(float(value), decimals) if decimals is not None else float(value)


def rows_json(probs: np.ndarray, policy: OutputPolicy, classes: list[str]) -> list[dict]:
    """Per-row answers for the JSON endpoint; lists the policy withholds are empty (not null: BentoML's
    client cannot read a null list)."""
    order = _order(probs)
    out = []
    for p, idx in zip(probs, order):
        label = int(idx[0])
        row = {"label": label, "class_name": classes[label], "probs": [], "topk": []}
        if policy.kind == "probs":
            row["probs"] = [_round(v, policy.decimals) for v in p.tolist()]
        elif policy.kind == "topk":
            row["topk"] = [{"index": int(c), "class_name": classes[int(c)], "prob": _round(p[c], policy.decimals)}
                           for c in idx[:policy.k]]
        out.append(row)
    return out


def topk_json(probs: np.ndarray, policy: OutputPolicy, classes: list[str], k: int) -> list[dict]:
    """Top classes of one image for the upload endpoint, within the policy: label → the label only
    (prob null); topk → at most the policy's k."""
    idx = _order(probs[None])[0]
    if policy.kind == "label":
        return [{"index": int(idx[0]), "class_name": classes[int(idx[0])], "prob": None}]
    if policy.kind == "topk":
        k = min(k, policy.k)
    return [{"index": int(c), "class_name": classes[int(c)], "prob": _round(probs[c], policy.decimals)}
            for c in idx[:k]]
