"""The students an audit adds for each synthetic strategy: the soft families on its inputs (KD on the quick grid
and logit-mse, named `kd@mixup`, `logit-mse@mixup`) and its label-only reference `ls@<strategy>` (LS over the
audit's ε grid on its label-only targets), with the epoch cap that bounds their cost."""
from __future__ import annotations

from audit.attacks import Variant
from audit.attacks.kd import QUICK_GRID

QUERY_ATTACKS = ("kd", "logit-mse")  # the families trained on every synthetic strategy's inputs
EPOCH_COST_CAP = 3  # a strategy's student costs at most this many rows-students (its steps)


def strategy_variants(variants: list[Variant], strategies: list[str],
                      ls_epsilons: tuple[float, ...]) -> tuple[list[Variant], list[Variant]]:
    """(attack variants, reference variants) on each synthetic strategy of `strategies`, from the attack
    variants chosen for the rows: logit-mse as is, kd on its quick grid (or the kd variants named, if none is on
    it)."""
    chosen = [v for v in variants if v.attack in QUERY_ATTACKS and not v.control]
    kd = [v for v in chosen if v.attack == "kd"]
    quick = [v for v in kd if v.options["temperature"] in QUICK_GRID["temperature"]
             and v.options["alpha"] in QUICK_GRID["alpha"]]
    base = [v for v in chosen if v.attack != "kd"] + (quick or kd)
    base.sort(key=chosen.index)
    attacks, refs = [], []
    for s in strategies:
        if s == "rows":
            continue
        attacks += [Variant(f"{v.name}@{s}", v.attack, v.options, v.needs_soft, queries=s) for v in base]
        refs += [Variant(f"ls-e{e:g}@{s}", "ls", {"epsilon": float(e)}, needs_soft=False, queries=s)
                 for e in ls_epsilons]
    return attacks, refs


def capped_epochs(epochs: int, train_rows: int, synthetic: int) -> int:
    """Epochs of a student on rows + `synthetic` inputs: the audit's, unless that costs more than EPOCH_COST_CAP
    rows-students' steps; then as many as fit in that cost (at least 1)."""
    ratio = (train_rows + synthetic) / max(1, train_rows)
    return epochs if ratio <= EPOCH_COST_CAP else max(1, int(EPOCH_COST_CAP * epochs / ratio))
