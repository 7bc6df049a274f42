"""A run's `metrics.jsonl`: one JSON line per finished epoch, the one reader of it.

Its own module so that the training loop (which appends to it) and the run-directory helpers and benchmarks
(which read it) import it instead of each other.
"""
from __future__ import annotations

import json
from pathlib import Path

METRICS = "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The epochs a run has finished, in order ([] before the first one)."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_seconds(run_dir: str | Path) -> float:
    """A run's training time as its epochs recorded it (its real cost even when a later invocation reused it)."""
    return sum(r.get("seconds", 0.0) for r in read_metrics(run_dir))
