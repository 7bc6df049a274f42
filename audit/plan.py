"""Which students an audit trains, and the choices it makes on the validation slice (docs/design.md §3).

Students are grouped into families: the references (`ls` over its ε grid, `ce`) and one family per attack
(`kd` over its T × α grid, the others with one configuration each). A family with several candidates trains
every candidate at the selection seeds and keeps the one with the best mean validation accuracy; only that
choice is trained at the other seeds, and only the choice is ever evaluated on the test split. Each family
therefore counts once in the verdict's multiplicity.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from audit.attacks import Variant
from audit.students import STUDENT_WEIGHTS_DIR, StudentTask

REFERENCE_FAMILIES = ("ls", "ce")


@dataclass
class Family:
    name: str
    candidates: list[Variant]
    reference: bool = False

    @property
    def needs_soft(self) -> bool:
        return self.candidates[0].needs_soft


def group_families(references: list[Variant], attacks: list[Variant]) -> dict[str, Family]:
    """Families in order: references first, then attacks as named."""
    families: dict[str, Family] = {}
    for v in references + attacks:
        if v.family not in families:
            families[v.family] = Family(v.family, [], reference=v.attack in REFERENCE_FAMILIES)  # ls@mixup too
        families[v.family].candidates.append(v)
    return families


class StudentPlan:
    """The students an audit needs given what is already trained (`store`, records by key), and its choices."""

    def __init__(self, families: dict[str, Family], identity: dict, train: dict, patience: int | None,
                 selection_seeds: int, controls: bool, out: Path, reference_identity: dict | None = None,
                 reference_dir: Path | None = None):
        self.families, self.identity, self.train, self.patience = families, identity, train, patience
        self.selection_seeds, self.controls, self.out = selection_seeds, controls, out
        # Reference students never see the teacher: keyed without it, they can be shared between audits.
        self.reference_identity = reference_identity or identity
        self.reference_dir = reference_dir
        self.store: dict[str, dict] = {}
        # Per query strategy (audit.queries): its cache fingerprint (in its students' keys) and training overrides.
        self.query_identity: dict[str, dict] = {}
        self.query_train: dict[str, dict] = {}

    def is_reference(self, family: str) -> bool:
        return family in self.families and self.families[family].reference

    def is_shared(self, family: str) -> bool:
        """References that never see the teacher (ls, ce on the rows) may be shared between audits."""
        return family in REFERENCE_FAMILIES and self.is_reference(family)

    def home(self, family: str) -> Path:
        """Where a family's students are stored: the shared references directory for references, if given."""
        return self.reference_dir if self.reference_dir is not None and self.is_shared(family) else self.out

    def key(self, variant: Variant, seed: int) -> str:
        identity = self.reference_identity if self.is_shared(variant.family) else self.identity
        queries = {"queries": self.query_identity[variant.queries]} if variant.queries != "rows" else {}
        blob = json.dumps({"variant": variant.name, "options": variant.options, "control": variant.control,
                           "seed": seed, **identity, **queries}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def task(self, family: str, variant: Variant, seed: int, evaluate_test: bool) -> StudentTask:
        key = self.key(variant, seed)
        weights = None if evaluate_test else str(self.home(family) / STUDENT_WEIGHTS_DIR / f"{key}.pt")
        train = {**self.train, **self.query_train.get(variant.queries, {})}
        return StudentTask(key=key, family=family, variant=variant, seed=seed, train=train,
                           patience=self.patience, evaluate_test=evaluate_test, weights=weights)

    def record(self, variant: Variant, seed: int) -> dict | None:
        return self.store.get(self.key(variant, seed))

    def choice(self, family: str) -> Variant | None:
        """The family's configuration: its only candidate, or the best mean validation accuracy over the
        selection seeds once every candidate has been trained there (None until then)."""
        candidates = self.families[family].candidates
        if len(candidates) == 1:
            return candidates[0]
        scores = self.validation_scores(family)
        if any(s is None for s in scores.values()):
            return None
        return max(candidates, key=lambda v: scores[v.name])  # ties: the first named

    def validation_scores(self, family: str) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for v in self.families[family].candidates:
            vals = [(self.record(v, s) or {}).get("val_accuracy") for s in range(self.selection_seeds)]
            out[v.name] = None if any(a is None for a in vals) else sum(vals) / len(vals)
        return out

    def tasks(self, seeds: int) -> list[StudentTask]:
        """Every student still to train for `seeds` paired seeds, given the choices made so far."""
        out: list[StudentTask] = []
        for name, fam in self.families.items():
            chosen = self.choice(name)
            if chosen is None:
                out += [self.task(name, v, s, evaluate_test=False) for s in range(self.selection_seeds)
                        for v in fam.candidates if self.record(v, s) is None]
                continue
            selecting = len(fam.candidates) > 1
            for s in range(seeds):
                rec = self.record(chosen, s)
                if rec is None or (rec.get("test_accuracy") is None and not self._weights(rec).exists()):
                    # A selection-seed student is kept (weights) for its test evaluation once chosen.
                    out.append(self.task(name, chosen, s, evaluate_test=not (selecting and s < self.selection_seeds)))
            if self.controls and fam.needs_soft and not fam.reference:
                control = chosen.label_control()
                out += [self.task(name, control, s, evaluate_test=True) for s in range(seeds)
                        if self.record(control, s) is None]
        return out

    def _weights(self, record: dict) -> Path:
        return self.home(record["family"]) / STUDENT_WEIGHTS_DIR / f"{record['key']}.pt"

    def awaiting_test(self, seeds: int) -> list[StudentTask]:
        """Chosen students trained at a selection seed whose test accuracy is still to be measured (from weights)."""
        out = []
        for name in self.families:
            chosen = self.choice(name)
            if chosen is None:
                continue
            for s in range(min(seeds, self.selection_seeds)):
                rec = self.record(chosen, s)
                if rec is not None and rec.get("test_accuracy") is None and self._weights(rec).exists():
                    out.append(self.task(name, chosen, s, evaluate_test=False))
        return out

    def accuracies(self, family: str, seeds: int, control: bool = False) -> list[float | None]:
        """Test accuracy of the family's choice (or its label control) at seeds 0..seeds−1 (None: not yet)."""
        chosen = self.choice(family)
        if chosen is None:
            return [None] * seeds
        v = chosen.label_control() if control else chosen
        return [(self.record(v, s) or {}).get("test_accuracy") for s in range(seeds)]

    def students(self, family: str, seeds: int) -> list[dict]:
        """Every record of a family's students within the first `seeds` seeds (candidates included)."""
        out = []
        for v in self.families[family].candidates:
            for s in range(seeds):
                rec = self.record(v, s)
                if rec is not None:
                    out.append(rec)
        return out

