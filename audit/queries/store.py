"""A strategy's queries on disk, beside the rows' cache: REPORT_DIR/queries/<strategy>/

  cache/          an `audit.cache.AnswerCache` (answers, have flags, counters, fingerprint) for its m queries
  inputs.npy      float32 (m, C, H, W) memory-mapped: the synthesised inputs, written before they are asked

The fingerprint holds the audit's identity, the real rows it draws from, the strategy, its recipe, rounds and
seed: a report directory holding another recipe's queries is refused (`CacheMismatchError`), never mixed. A
resumed audit regenerates each wave from the seed and the cached answers; an input that differs from the one
answered before is refused too, so a wave is never asked twice nor paired with another wave's answers.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from audit.cache import FINGERPRINT, AnswerCache, CACHE_DIR, CacheMismatchError
from audit.oracle import Oracle
from audit.queries.base import QueryContext, QuerySpec, SyntheticSet

QUERIES_DIR = "queries"
INPUTS = "inputs.npy"


class QueryStore:
    def __init__(self, out: Path, spec: QuerySpec, fingerprint: dict, size: int, num_classes: int,
                 input_shape: list[int]):
        self.dir = Path(out) / QUERIES_DIR / spec.name
        existed = (self.dir / CACHE_DIR / FINGERPRINT).exists()
        # the rows' cache has already refused an unidentified model unless the user allowed it; these queries
        # share its identity, so they do not ask again
        self.cache = AnswerCache(self.dir, fingerprint, size, num_classes, allow_unidentified=True)
        shape = (size, *input_shape)
        path = self.dir / INPUTS
        if existed:
            if not path.exists():
                raise CacheMismatchError(f"{path} is missing beside its answers; use a new --out directory")
            self.inputs = np.load(path, mmap_mode="r+")
            if self.inputs.shape != shape:
                raise CacheMismatchError(f"{path} holds inputs of shape {self.inputs.shape}, expected {shape}")
        else:
            self.inputs = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
        self.cached_before = size - len(self.cache.missing())
        self.asked = 0
        self.offset = 0

    def ask(self, oracle: Oracle, x: np.ndarray, batch_rows: int, bar=None) -> np.ndarray:
        """Answers for the next wave `x`: from the cache where this wave was answered before, else from the
        oracle `batch_rows` at a time, each batch stored as it arrives."""
        idx = np.arange(self.offset, self.offset + len(x))
        if len(idx) == 0:
            return np.zeros((0, self.cache.num_classes), np.float32)
        if idx[-1] >= self.cache.rows:
            raise RuntimeError(f"{self.dir.name}: wave past the {self.cache.rows} queries planned")
        have = np.asarray(self.cache.have[idx])
        if have.any() and not np.array_equal(np.asarray(self.inputs[idx[have]]), x[have]):
            raise CacheMismatchError(f"{self.dir}: the regenerated queries differ from those answered in an earlier "
                                     "session; refusing to mix two query sets: use a new --out directory")
        self.inputs[idx] = x
        self.inputs.flush()  # before the answers: a crash leaves an input unanswered (asked again), never the reverse
        todo = np.flatnonzero(~have)
        for start in range(0, len(todo), batch_rows):
            part = todo[start:start + batch_rows]
            self.cache.store(idx[part], oracle.query(x[part]))
            self.asked += len(part)
            if bar is not None:
                bar.update(len(part))
        self.offset += len(x)
        return np.array(self.cache.answers[idx])

    def stats(self) -> dict:
        c = self.cache.counters
        return {"queries": self.cache.rows, "asked_this_run": self.asked, "cached_before_this_run": self.cached_before,
                "rows_sent_total": c["rows_sent"], "requests_total": c["requests"], "sessions": c["sessions"]}


def collect_strategy(spec: QuerySpec, ctx: QueryContext, oracle: Oracle, out: Path, fingerprint: dict,
                     batch_rows: int, progress: bool = True) -> tuple[SyntheticSet, dict]:
    """Run a strategy against the oracle through its store: (its synthetic set, its query counts)."""
    from tqdm import tqdm

    size = spec.size(len(ctx.y), ctx.rounds)
    store = QueryStore(out, spec, fingerprint, size, ctx.num_classes, list(ctx.x.shape[1:]))
    with tqdm(total=size - store.cached_before, desc=f"querying {spec.name}", unit="query", disable=not progress,
              dynamic_ncols=True, mininterval=0.5) as bar:
        synthetic = spec.synthesise(ctx, lambda x: store.ask(oracle, x, batch_rows, bar))
    if len(synthetic.y) != size:
        raise RuntimeError(f"{spec.name} produced {len(synthetic.y)} queries, {size} planned")
    return synthetic, store.stats()
