"""What a defence costs in accuracy, over teacher seeds: each row's recipe trained at several seeds beside CE, the
accuracy drop paired by seed (the same seed gives both the same initialisation and data order).

One teacher per recipe measures a difference of a few tenths of a point with run-to-run noise of the same size;
the target (CMIM ≥ CE − 0.3 points) is read here as the mean paired drop with its one-sided 95% upper bound.
Runs are `runs/RECIPE@SEED` (`runs/RECIPE` at seed 0) and finished ones are reused.
Results: bench/results/teacher-seeds-<dataset>.{json,md}.

    python -m experiments.teacher_seeds --seeds 3                # CE and CMIM, protect train's defaults
    python -m experiments.teacher_seeds --teachers ce,cmim,cmim-lam40-warm --seeds 5 --device cuda
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from audit.stats import summarise, t_quantile
from experiments.common import provenance, write_results
from experiments.scale import add_teacher_args, resolve_teacher_scale
from experiments.teachers import Teacher, load_recipe, train_teachers
from protect.history import read_metrics, training_seconds
from protect.recipes import Recipe

DROP_MAX_POINTS = 0.3


def paired_drop(ce: list[float], other: list[float]) -> dict:
    """CE − other in points, paired by seed: mean, std, one-sided 95% upper bound (Student t; None under 2 seeds)."""
    d = [100 * (a - b) for a, b in zip(ce, other)]
    s = summarise(d)
    upper = None if s["std"] is None else s["mean"] + t_quantile(0.95, s["n"] - 1) * s["std"] / s["n"] ** 0.5
    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 3)

    return {"per_seed": [round(x, 3) for x in d], "mean": r(s["mean"]), "std": r(s["std"]), "upper": r(upper)}


def seed_runs(work: Path, recipe: Recipe, seeds, args) -> dict[str, dict]:
    """Train `recipe` at each teacher seed into runs/RECIPE@SEED (finished runs reused) and read each run's
    last-epoch test accuracy (a fraction), CMI at T = 1 and recorded training seconds, by seed (a string)."""
    teachers = [Teacher(recipe, seed) for seed in seeds]
    train_teachers(work, teachers, args)
    out = {}
    for t in teachers:
        last = read_metrics(work / "runs" / t.run)[-1]
        out[str(t.seed)] = {"test_accuracy": last["test_acc"], "cmi_1": last["test_cmi"]["1"],
                            "training_seconds": round(training_seconds(work / "runs" / t.run), 1)}
    return out


def markdown(result: dict) -> str:
    s, rows = result["settings"], result["teachers"]
    seeds = sorted({k for r in rows.values() for k in r["accuracy"]}, key=int)
    recorded = sum(x for r in rows.values() for x in r.get("training_seconds", {}).values())
    runs = sum(len(r.get("training_seconds", {})) for r in rows.values())
    lines = [f"# Teacher accuracy over seeds: {s['dataset']}", "",
             f"Command: `{result['command']}`  ", f"Machine: {result['machine']}  ",
             f"Date: {result['date']}; training time recorded in the runs: {recorded / 60:.1f} min, "
             f"{recorded / 60 / max(1, runs):.1f} min per teacher (this invocation: {result['wall_seconds'] / 60:.1f} "
             "min wall)", "",
             f"`{s['teacher_arch']}`, {s['teacher_epochs']} epochs on {s['train_limit'] or 'all'} training rows; test "
             "accuracy (%) of the last epoch; drop = CE − teacher in points, paired by seed, with its one-sided 95% "
             "upper bound (Student t).", "",
             "| teacher | " + " | ".join(f"seed {k}" for k in seeds) + " | mean | CMI T=1 (mean) | drop vs CE "
             "(mean, ≤ upper) |", "|---|" + "---|" * (len(seeds) + 3)]
    for name, r in rows.items():
        accs = " | ".join(f"{100 * r['accuracy'][k]:.2f}" if k in r["accuracy"] else "–" for k in seeds)
        drop = r.get("drop_vs_ce")
        cell = "–" if not drop else (f"{drop['mean']:+.2f}" + (f" (≤ {drop['upper']:+.2f})" if drop["upper"] is not None
                                                                else ""))
        lines.append(f"| {name} | {accs} | {100 * r['mean_accuracy']:.2f} | {r['mean_cmi_1']:.4f} | {cell} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teachers", default="ce,cmim", help="recipes of recipes/teachers: ce first (the drop's reference)")
    p.add_argument("--seeds", type=int, default=3, help="teacher seeds 0..N-1 per row")
    add_teacher_args(p, teacher_seed=False)
    p.add_argument("--work", type=Path, default=Path("experiments/work/teacher-seeds"))
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args()
    resolve_teacher_scale(args)
    names = [t for t in args.teachers.split(",") if t]
    if names[0] != "ce" or args.seeds < 1:
        raise SystemExit("--teachers must start with ce (the reference of the drop) and --seeds must be ≥ 1")
    recipes = {n: load_recipe(n) for n in names}
    if any(r.init_from or r.reference_from for r in recipes.values()):
        raise SystemExit("only teachers trained from scratch can be compared over seeds (not fine-tuned ones)")
    started = time.time()
    work = args.work / args.dataset
    rows: dict[str, dict] = {}
    for name, recipe in recipes.items():
        runs = seed_runs(work, recipe, range(args.seeds), args)
        accuracy = {k: r["test_accuracy"] for k, r in runs.items()}
        rows[name] = {"flags": recipe.flags(), "accuracy": accuracy,
                      "mean_accuracy": statistics.fmean(accuracy.values()),
                      "mean_cmi_1": statistics.fmean(r["cmi_1"] for r in runs.values()),
                      "training_seconds": {k: r["training_seconds"] for k, r in runs.items()}}
        if name != "ce":
            rows[name]["drop_vs_ce"] = paired_drop(list(rows["ce"]["accuracy"].values()), list(accuracy.values()))
            rows[name]["drop_within_target"] = rows[name]["drop_vs_ce"]["mean"] <= DROP_MAX_POINTS
    result = {**provenance("experiments.teacher_seeds", args, started, work), "teachers": rows,
              "drop_max_points": DROP_MAX_POINTS}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"teacher-seeds-{args.dataset}"
    write_results(stem.with_suffix(".json"), result, markdown)
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
