"""The attack battery (docs/design.md §4): one class per file, a registry `ATTACKS`, and the references (LS, CE).

`ATTACKS.get(name)` gives an `AttackSpec`; `expand_attacks("all" | "a,b,...")` turns a selection into the
concrete students to train (`kd` becomes one variant per (T, α) of its grid, e.g. `kd-T4-a0.9`; a single
variant may also be named directly).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from protect.metrics import TAU_BOUNDS
from protect.objectives.base import Objective
from protect.registry import Registry, UnknownNameError

from audit.attacks.base import Attack, AttackContext
from audit.attacks.calibrated_kd import CalibratedKD, calibration_slice, fit_temperature
from audit.attacks.dkd import DKD
from audit.attacks.hard_label import HardLabel
from audit.attacks.kd import FULL_GRID, KD, QUICK_GRID, variant_name
from audit.attacks.logit_mse import LogitMSE
from audit.attacks.logit_std import LogitStd
from audit.attacks.mimkd import MIMKD
from audit.attacks.skeptical import Skeptical
from audit.attacks.vid import VID


@dataclass(frozen=True)
class AttackSpec:
    name: str
    summary: str
    build: Callable[..., Objective]  # build(ctx: AttackContext, **options)
    needs_soft: bool = True  # False: the teacher's label is enough (a label-only endpoint can be attacked)
    grid: dict[str, list] = field(default_factory=dict)
    options: dict = field(default_factory=dict)  # fixed options, part of its students' keys


@dataclass(frozen=True)
class Variant:
    """One concrete student recipe: an attack (or reference) with fixed options."""

    name: str
    attack: str
    options: dict
    needs_soft: bool = True
    control: bool = False  # trained on a label-only "teacher" (one-hot true labels) instead of the oracle's answers
    queries: str = "rows"  # the query strategy whose inputs it trains on (audit.queries); `name` ends in @queries

    @property
    def family(self) -> str:
        """The attack family (or reference) it belongs to: one test per family in the verdict."""
        return self.attack if self.queries == "rows" else f"{self.attack}@{self.queries}"

    def label_control(self) -> "Variant":
        """The same recipe with the teacher replaced by the true labels: what it gains without the teacher."""
        return Variant(f"{self.name}{CONTROL_SUFFIX}", self.attack, self.options, self.needs_soft, control=True,
                       queries=self.queries)

    def build(self, ctx: AttackContext) -> Objective:
        if self.attack == "ls" and self.queries != "rows":  # label smoothing of mixed or top-1 label targets
            from audit.queries.students import SoftLabelSmoothing

            return SoftLabelSmoothing(ctx.num_classes, **self.options)
        if self.attack in REFERENCE_NAMES:
            return _build_reference(self.attack, ctx, **self.options)
        return ATTACKS.get(self.attack).build(ctx, **self.options)


def _calibrated(ctx: AttackContext, tau_bounds=TAU_BOUNDS, **options) -> CalibratedKD:
    """τ is fitted on the audit's validation slice; without one (library use), on a fixed 10% of the rows. The
    search range is an option, so students fitted in another range are never reused as this one's."""
    lo, hi = tau_bounds
    if ctx.val_logp is not None and ctx.val_labels is not None:
        return CalibratedKD(fit_temperature(ctx.val_logp, ctx.val_labels, lo, hi), **options)
    if ctx.teacher_logp is None or ctx.labels is None:
        raise ValueError("calibrated-kd needs the teacher's log-probabilities and labels of a validation slice")
    idx = calibration_slice(len(ctx.labels))
    return CalibratedKD(fit_temperature(ctx.teacher_logp[idx], ctx.labels[idx], lo, hi), **options)


ATTACKS: Registry[AttackSpec] = Registry("attack")
for _spec in [
    AttackSpec("kd", "Hinton KD: α·T²·KL(teacher^T ‖ student^T) + (1−α)·CE, over T∈{1,2,4,8,16,32} × α∈{0.5,0.9}",
               lambda ctx, **o: KD(**o), grid=FULL_GRID),
    AttackSpec("hard-label", "CE on the teacher's argmax (the only attack a label-only endpoint allows)",
               lambda ctx, **o: HardLabel(**o), needs_soft=False),
    AttackSpec("logit-mse", "MSE between student logits and the teacher's centred log-probs, + CE",
               lambda ctx, **o: LogitMSE(**o)),
    AttackSpec("logit-std", "KD on z-scored logits (logit standardisation, CVPR 2024): T 2, weight 9, + 0.1·CE",
               lambda ctx, **o: LogitStd(**o)),
    AttackSpec("dkd", "decoupled KD (CVPR 2022): α 1·TCKD + β 8·NCKD at T 4 with warm-up, + CE",
               lambda ctx, **o: DKD(**o)),
    AttackSpec("skeptical", "Skeptical Student (NeurIPS 2021): teacher KD only on an auxiliary mid-layer head, "
               "after a delay; final head from labels + self-distillation",
               lambda ctx, **o: Skeptical(ctx.num_classes, ctx.feature_dims, **o)),
    AttackSpec("calibrated-kd", "temperature-scale the teacher on a held-out 10% slice against labels, then KD",
               _calibrated, options={"tau_bounds": list(TAU_BOUNDS)}),
    AttackSpec("vid", "variational information distillation (CVPR 2019): Gaussian q(t|s), MLP mean, learned variance",
               lambda ctx, **o: VID(ctx.num_classes, ctx.feature_dims, **o)),
    AttackSpec("mimkd", "MI maximisation KD (Shrivastava et al. 2021): Jensen–Shannon bound, critic on (student "
               "feature, teacher output), in-batch negatives",
               lambda ctx, **o: MIMKD(ctx.num_classes, ctx.feature_dims, **o)),
]:
    ATTACKS.register(_spec.name)(_spec)

BATTERY = ("kd", "hard-label", "logit-mse", "logit-std", "dkd", "skeptical", "calibrated-kd", "vid", "mimkd")
assert sorted(BATTERY) == ATTACKS.names()
LS_EPSILONS = (0.05, 0.1, 0.2)
CONTROL_SUFFIX = "@labels"
REFERENCE_NAMES = ("ls", "ce")


def _build_reference(name: str, ctx: AttackContext, **options) -> Objective:
    from protect.objectives import OBJECTIVES

    return OBJECTIVES.get(name)(ctx.num_classes, **options)


def reference_variants(ls_epsilons=LS_EPSILONS, ce: bool = True) -> list[Variant]:
    """The label-only references: LS over its ε grid (one is chosen on validation) and, unless `ce` is False, a
    plain CE student (reported only; the verdict compares with LS)."""
    return [Variant(f"ls-e{e:g}", "ls", {"epsilon": float(e)}, needs_soft=False) for e in ls_epsilons] + \
        ([Variant("ce", "ce", {}, needs_soft=False)] if ce else [])


_KD_VARIANT = re.compile(r"^kd-T([0-9.]+)-a([0-9.]+)$")


def expand_attacks(selection: str | list[str], kd_grid: str = "full") -> list[Variant]:
    """'all' or a comma-separated list of attack (or kd variant) names → the variants to train, in order.

    Raises UnknownNameError listing the valid names for an unknown one.
    """
    names = [n.strip() for n in (selection.split(",") if isinstance(selection, str) else selection) if n.strip()]
    if not names:
        raise UnknownNameError(f"no attack named; valid names: all, {', '.join(ATTACKS.names())}")
    if "all" in names:
        names = list(BATTERY)
    if kd_grid not in ("full", "quick"):
        raise ValueError(f"kd grid must be 'full' or 'quick', got {kd_grid!r}")
    out: list[Variant] = []
    for name in names:
        m = _KD_VARIANT.match(name)
        if m:
            t, a = float(m.group(1)), float(m.group(2))
            out.append(Variant(variant_name(t, a), "kd", {"temperature": t, "alpha": a}))
            continue
        spec = ATTACKS.get(name)
        if spec.grid:
            grid = FULL_GRID if kd_grid == "full" else QUICK_GRID
            for t in grid["temperature"]:
                for a in grid["alpha"]:
                    out.append(Variant(variant_name(t, a), "kd", {"temperature": t, "alpha": a}))
        else:
            out.append(Variant(name, name, dict(spec.options), needs_soft=spec.needs_soft))
    seen: set[str] = set()
    return [v for v in out if not (v.name in seen or seen.add(v.name))]


__all__ = ["ATTACKS", "BATTERY", "CONTROL_SUFFIX", "AttackContext", "AttackSpec", "Attack", "Variant", "expand_attacks", "reference_variants",
           "LS_EPSILONS", "KD", "HardLabel", "LogitMSE", "LogitStd", "DKD", "Skeptical", "CalibratedKD", "VID", "MIMKD"]
