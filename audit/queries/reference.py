"""One label-only reference for the verdict: the best on the validation slice of `ls` (the rows' true labels)
and each strategy's `ls@<strategy>` (its inputs' label-only targets). Every family's Δ is against it, seed by
seed; with `rows` alone it is `ls`, as before query strategies."""
from __future__ import annotations


def reference_pool(plan) -> list[str]:
    """The LS families of the audit (`ls` first), in the order they were planned."""
    return [n for n, f in plan.families.items() if f.reference and f.candidates[0].attack == "ls"]


def _scores(plan) -> dict[str, float | None]:
    out = {}
    for name in reference_pool(plan):
        chosen = plan.choice(name)
        out[name] = None if chosen is None else plan.validation_scores(name)[chosen.name]
    return out


def verdict_reference(plan) -> str | None:
    """The reference family's name, or None while some candidate's validation accuracy is missing."""
    pool = reference_pool(plan)
    if len(pool) == 1:
        return pool[0]
    scores = _scores(plan)
    if any(s is None for s in scores.values()):
        return None
    return max(pool, key=lambda n: scores[n])  # ties: the first planned (ls)


def reference_summary(plan, seeds: int) -> dict | None:
    """Which reference won, its validation accuracy and that of the others (mean over the selection seeds), its
    lead over the runner-up on validation and its paired test Δ against `ls`, in points."""
    name = verdict_reference(plan)
    if name is None:
        return None
    scores = _scores(plan)
    others = [s for n, s in scores.items() if n != name and s is not None]
    out = {"family": name, "selected": plan.choice(name).name, "chosen_on": "validation",
           "validation_accuracy": scores, "lead_on_validation": None if not others or scores[name] is None
           else 100 * (scores[name] - max(others)), "test_delta_vs_ls": None}
    ref, ls = plan.accuracies(name, seeds), plan.accuracies("ls", seeds)
    if all(a is not None for a in ref + ls) and seeds:
        out["test_delta_vs_ls"] = 100 * sum(a - b for a, b in zip(ref, ls)) / seeds
    return out
