"""The oracle's answers, cached on disk in the report directory as they arrive (DESIGN §3).

REPORT_DIR/cache/
  fingerprint.json   who was asked about what: model sha256, output policy, dataset, transfer-set size
  answers.npy        float32 (N, C) memory-mapped; row i is valid iff have[i]
  have.npy           bool (N,) memory-mapped, flushed after each batch's answers
  counters.json      rows and requests sent, over all sessions of this audit

A rerun with the same audit identity asks only for the rows it lacks; a different identity is refused
(`CacheMismatchError`) rather than mixed. Answers are flushed before their `have` flags, so a crash between
the two can only make a row be asked again, never be read unanswered.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

CACHE_DIR = "cache"
FINGERPRINT = "fingerprint.json"
ANSWERS = "answers.npy"
HAVE = "have.npy"
COUNTERS = "counters.json"


class CacheMismatchError(RuntimeError):
    """The report directory holds the cache of a different audit."""


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


class AnswerCache:
    def __init__(self, report_dir: str | Path, fingerprint: dict, rows: int, num_classes: int):
        self.dir = Path(report_dir) / CACHE_DIR
        self.fingerprint = {**fingerprint, "rows": int(rows), "num_classes": int(num_classes)}
        self.rows, self.num_classes = int(rows), int(num_classes)
        fp_path = self.dir / FINGERPRINT
        if fp_path.exists():
            try:
                old = json.loads(fp_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise CacheMismatchError(f"{fp_path} is corrupt ({exc}); use a new --out directory") from exc
            diff = {k: (old.get(k), v) for k, v in self.fingerprint.items() if old.get(k) != v}
            diff.update({k: (v, None) for k, v in old.items() if k not in self.fingerprint})
            if diff:
                parts = "; ".join(f"{k}: cached {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
                raise CacheMismatchError(
                    f"{self.dir.parent} holds the answer cache of a different audit ({parts}). Refusing to mix "
                    "answers: choose another --out directory (the cache there is left untouched).")
            self.answers = np.load(self.dir / ANSWERS, mmap_mode="r+")
            self.have = np.load(self.dir / HAVE, mmap_mode="r+")
            if self.answers.shape != (self.rows, self.num_classes) or self.have.shape != (self.rows,):
                raise CacheMismatchError(f"{self.dir}: cache arrays have shapes {self.answers.shape}, "
                                         f"{self.have.shape}, expected ({self.rows}, {self.num_classes})")
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.answers = np.lib.format.open_memmap(self.dir / ANSWERS, mode="w+", dtype=np.float32,
                                                     shape=(self.rows, self.num_classes))
            self.have = np.lib.format.open_memmap(self.dir / HAVE, mode="w+", dtype=np.bool_, shape=(self.rows,))
            self.answers.flush()
            self.have.flush()
            _write_json_atomic(fp_path, self.fingerprint)  # last: a cache without it is rebuilt from scratch
        counters = self.dir / COUNTERS
        self.counters = json.loads(counters.read_text()) if counters.exists() else {"rows_sent": 0, "requests": 0,
                                                                                       "sessions": 0}
        self.counters["sessions"] += 1
        self.session_rows = 0
        self._save_counters()

    def _save_counters(self) -> None:
        _write_json_atomic(self.dir / COUNTERS, self.counters)

    def missing(self) -> np.ndarray:
        """Indices of rows without an answer, ascending."""
        return np.flatnonzero(~np.asarray(self.have))

    @property
    def complete(self) -> bool:
        return bool(np.asarray(self.have).all())

    def store(self, indices: np.ndarray, answers: np.ndarray, requests: int = 1) -> None:
        indices = np.asarray(indices)
        if answers.shape != (len(indices), self.num_classes):
            raise ValueError(f"answers of shape {answers.shape} for {len(indices)} rows × {self.num_classes} classes")
        self.answers[indices] = answers
        self.answers.flush()
        self.have[indices] = True
        self.have.flush()
        self.counters["rows_sent"] += int(len(indices))
        self.counters["requests"] += int(requests)
        self.session_rows += int(len(indices))
        self._save_counters()

    def read(self) -> np.ndarray:
        if not self.complete:
            raise RuntimeError(f"{len(self.missing())} rows have no answer yet")
        return np.array(self.answers)
