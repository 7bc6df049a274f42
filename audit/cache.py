"""The oracle's answers, cached on disk in the report directory as they arrive (docs/design.md §3).

REPORT_DIR/cache/
  fingerprint.json   who was asked about what: model sha256, output policy, dataset, transfer-set size
  answers.npy        float32 (N, C) memory-mapped; row i is valid iff have[i]
  have.npy           bool (N,) memory-mapped, flushed after each batch's answers
  counters.json      rows and requests sent, over all sessions of this audit

A rerun with the same audit identity asks only for the rows it lacks; a different identity is refused
(`CacheMismatchError`, naming each field that differs) rather than mixed. The endpoint's URL is not part of the
identity: a resumed audit may find the same model on another port. The model is identified by the sha256 the
oracle reports, so an oracle that reports none is refused (`UnidentifiedModelError`) unless the caller allows it
(`audit run --allow-unidentified-model`): two such models could not be told apart on resume. Answers are flushed
before their `have` flags, so a crash between the two can only make a row be asked again, never be read
unanswered.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from protect.atomic import write_json_atomic

CACHE_DIR = "cache"
FINGERPRINT = "fingerprint.json"
ANSWERS = "answers.npy"
HAVE = "have.npy"
COUNTERS = "counters.json"


class CacheMismatchError(RuntimeError):
    """The report directory holds the cache of a different audit."""


class UnidentifiedModelError(CacheMismatchError):
    """The oracle reports no model sha256: its answers could not be told from another model's on resume."""


# What a differing fingerprint field means, for the refusal's message.
FIELD_MEANING = {"model_sha256": "the oracle serves another model", "output_policy": "the oracle reveals its "
                 "answers under another output policy", "dataset": "another --dataset", "input_shape": "another "
                 "input shape", "rows": "another transfer-set size (--budget)", "num_classes": "another class count"}


class AnswerCache:
    def __init__(self, report_dir: str | Path, fingerprint: dict, rows: int, num_classes: int, *,
                 allow_unidentified: bool = False, source: str = "the oracle"):
        if not str(fingerprint.get("model_sha256") or "").strip() and not allow_unidentified:
            raise UnidentifiedModelError(
                f"{source} reports no model_sha256 in /metadata, so its cached answers could not be told from "
                "another model's when the audit resumes. Serve the model with its model.json (serving reports its "
                "onnx_sha256), or pass --allow-unidentified-model to audit it anyway (then resume only against the "
                "very same model). Nothing was queried.")
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
                parts = "; ".join(f"{k}: cached {a!r}, now {b!r}" + (f" ({FIELD_MEANING[k]})" if k in FIELD_MEANING
                                                                       else "") for k, (a, b) in sorted(diff.items()))
                raise CacheMismatchError(
                    f"{self.dir.parent} holds the answer cache of a different audit; {', '.join(sorted(diff))} "
                    f"differ{'s' if len(diff) == 1 else ''}: {parts}. Refusing to mix answers: choose another "
                    "--out directory (the cache there is left untouched), or resume against the model, policy and "
                    "dataset it was made with.")
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
            write_json_atomic(fp_path, self.fingerprint)  # last: a cache without it is rebuilt from scratch
        counters = self.dir / COUNTERS
        self.counters = json.loads(counters.read_text()) if counters.exists() else {"rows_sent": 0, "requests": 0,
                                                                                       "sessions": 0}
        self.counters["sessions"] += 1
        self.session_rows = 0
        self._save_counters()

    def _save_counters(self) -> None:
        write_json_atomic(self.dir / COUNTERS, self.counters)

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
