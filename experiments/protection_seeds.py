"""Protection over teacher seeds: does the default recipe hold for the seeds a user draws?

What it runs, in order, writing its results file after each step:
  1. the rows (default ce, cmim, cmim@1, cmim@2, mcmi, nasty: teacher recipes of recipes/teachers, @SEED for
     another teacher seed), each trained into runs/RECIPE@SEED and audited like experiments.protection does, at
     the `protection` audit recipe (the whole battery on the rows and off the manifold, 8 paired student seeds);
     a row inconclusive there is re-audited with `--seeds auto` (up to 12 seeds; its students are reused);
  2. the accuracy of ce and cmim over teacher seeds 0-4 (last-epoch test accuracy, as experiments.teacher_seeds
     reads it; runs shared with the rows', so cmim@1 trains once);
  3. the MCMI teacher's KD student − the CE teacher's KD student, paired by student seed (from the two rows'
     audit reports; a row imported without them gets a KD-only audit, the same KD students).

Targets: each CMIM teacher undistillable, the CE teacher distillable, mean CMIM accuracy ≥ mean CE − 0.3 points
(the results' .md says which are reached, "not yet measured" for what is missing).

Cost on 2 CPU cores: about 8 minutes per teacher and 1.2 hours per row's audit (13 families × 8 students; the
ce row took 74 minutes), half as much again for a row re-audited with --seeds auto: some 9 to 12 hours in all,
over several sessions if need be. On a GPU (`--device cuda --jobs N`) far less.

Resuming: the results file is bench/results/protection-seeds-<dataset>.json (+ .md), marked `partial` with its
missing rows and parts until everything is in. On start it is read back: every teacher entry whose recipe name,
recipe hash, teacher seed and settings (dataset, teacher scale, resolved audit settings) equal what is asked is
kept and not recomputed (it says so; `--redo ROW` recomputes one), and so are the per-seed accuracies. So a
session whose disk is gone resumes from the committed file; within a session, finished teachers, answer caches
and students in --work are reused as well. `--import FILE` takes the matching finished rows of a results file of
experiments.protection at the same settings (one at other settings is refused, naming the setting).

    python -m experiments.protection_seeds
    python -m experiments.protection_seeds --import bench/results/protection-queries-fashion-mnist.json
    python -m experiments.protection_seeds --device cuda --jobs 12 --redo cmim@2
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

from experiments.audits import produce_rows
from experiments.common import machine, write_results
from experiments.scale import add_audit_args, add_teacher_args, resolve_scale
from experiments.seed_report import evaluate_targets, markdown, mcmi_vs_ce_kd
from experiments.seed_rows import (imported_entries, kd_accuracies, keep_reason, scale, scale_differences,
                                   teacher_entry)
from experiments.teacher_seeds import seed_runs
from experiments.teachers import Row, Teacher, asked_recipe_hash, load_recipe, parse_row

SCRIPT = "experiments.protection_seeds"
DEFAULT_ROWS = "ce,cmim,cmim@1,cmim@2,mcmi,nasty"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {SCRIPT}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_teacher_args(p)
    add_audit_args(p, audit="protection")
    p.add_argument("--teachers", default=DEFAULT_ROWS, help="rows, in order: RECIPE or RECIPE@SEED of recipes/teachers")
    p.add_argument("--accuracy-modes", default="ce,cmim", help="recipes whose accuracy is measured over teacher seeds")
    p.add_argument("--accuracy-seeds", type=int, default=5, help="teacher seeds 0..N-1 of the accuracy part")
    p.add_argument("--redo", default="", help="rows to recompute although the results file has them (comma list)")
    p.add_argument("--import", dest="imports", type=Path, action="append", default=[], metavar="FILE",
                   help="a results file of experiments.protection whose matching finished rows are taken (repeatable)")
    p.add_argument("--no-reaudit", action="store_true", help="leave inconclusive rows at the recipe's seeds")
    p.add_argument("--work", type=Path, default=Path("experiments/work/protection-seeds"))
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="the results file's folder")
    return p


def measure(work: Path, row: Row, args) -> dict:
    """Train, export and audit one row; re-audit with `--seeds auto` where the recipe's seeds leave it open."""
    done = produce_rows(work, [row], args, lambda _: None, SCRIPT)[row.name]
    seeds = args.seeds
    if done["audit"]["outcome"] == "inconclusive" and seeds != "auto" and not args.no_reaudit:
        print(f"{row.name}: inconclusive at {seeds} seeds: re-audited with --seeds auto", flush=True)
        seeds = "auto"
        done = produce_rows(work, [row], argparse.Namespace(**{**vars(args), "seeds": seeds}), lambda _: None,
                            SCRIPT)[row.name]
    kd = kd_accuracies(work / "reports" / row.name / "report.json")
    return teacher_entry(row, done, done["recipe"]["sha256"], kd, seeds, "measured")


def kd_students(work: Path, row: Row, args) -> list[float]:
    """The KD students of a row kept without their per-seed accuracies (an imported summary): an audit of its
    teacher by the KD families alone, at the same transfer set, seeds and grid, into reports/ROW-kd. Students are
    chosen family by family on validation, so these are the KD students the whole battery trains."""
    from experiments.audits import audit, export
    from experiments.teachers import train_teachers

    train_teachers(work, [row.teacher], args)
    model = export(work, row.model, work / "runs" / row.teacher.run, args)
    kd = [a for a in args.attacks.split(",") if a == "kd" or a.startswith("kd-")]  # the battery's KD variants
    only = argparse.Namespace(**{**vars(args), "attacks": ",".join(kd) if kd and args.attacks != "all" else "kd"})
    audit(work, model, f"{row.name}-kd", row.policy, only, SCRIPT)
    return kd_accuracies(work / "reports" / f"{row.name}-kd" / "report.json")


def accuracy_entry(recipe: str, sha256: str, per_seed: dict[str, float]) -> dict:
    per = {k: per_seed[k] for k in sorted(per_seed, key=int)}
    return {"recipe": recipe, "recipe_sha256": sha256, "seeds": [int(k) for k in per],
            "mean": statistics.fmean(per.values()) if per else None, "per_seed": per}


def earlier_result(path: Path, asked: dict) -> dict:
    """The results file already at --out, if it was measured at the settings asked for (else nothing is kept)."""
    if not path.exists():
        return {}
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        print(f"{path}: unreadable ({exc}): nothing kept from it", flush=True)
        return {}
    differ = scale_differences(result.get("settings", {}).get("scale", {}), asked)
    if differ:
        print(f"{path} was measured at other settings ({', '.join(differ)}): nothing kept from it", flush=True)
        return {}
    return result


def main() -> None:
    args = build_parser().parse_args()
    resolve_scale(args)
    work = args.work / args.dataset
    rows = [parse_row(t, args.teacher_seed) for t in args.teachers.split(",") if t]
    if any(r.policy or r.recalibrate for r in rows):
        raise SystemExit("--teachers: rows here are teacher recipes (RECIPE or RECIPE@SEED), not served variants")
    redo = {r for r in args.redo.split(",") if r}
    asked = scale(vars(args))
    hashes = {r.name: asked_recipe_hash(work, r.teacher, args) for r in rows}
    path = args.out / f"protection-seeds-{args.dataset}.json"
    earlier = earlier_result(path, asked)
    old = {e["row"]: e for e in earlier.get("teachers", [])}
    teachers: dict[str, dict] = {}
    for r in rows:
        reason = None if r.name in redo else keep_reason(old.get(r.name), r, hashes[r.name], not args.no_reaudit)
        if reason:
            print(f"{r.name}: kept from {path} ({reason})", flush=True)
            teachers[r.name] = old[r.name]
    for f in args.imports:
        for name, entry in imported_entries(f, rows, hashes, asked, not args.no_reaudit).items():
            if name not in teachers and name not in redo:
                print(f"{name}: imported from {f}", flush=True)
                teachers[name] = entry
    modes = {m: load_recipe(m) for m in args.accuracy_modes.split(",") if m}
    accuracy = {}
    for m, recipe in modes.items():
        sha = asked_recipe_hash(work, Teacher(recipe), args)
        before = earlier.get("accuracy_over_teacher_seeds", {}).get(m) or {}
        kept = before.get("per_seed", {}) if before.get("recipe_sha256") == sha else {}
        if kept:
            print(f"accuracy of {m}: seeds {', '.join(kept)} kept from {path}", flush=True)
        accuracy[m] = accuracy_entry(m, sha, {k: v for k, v in kept.items() if int(k) < args.accuracy_seeds})

    def write() -> None:
        missing = [r.name for r in rows if r.name not in teachers]
        parts = [f"accuracy_over_teacher_seeds.{m}: seeds "
                 + ",".join(str(s) for s in range(args.accuracy_seeds) if s not in a["seeds"])
                 for m, a in accuracy.items() if len(a["seeds"]) < args.accuracy_seeds]
        kd = mcmi_vs_ce_kd(teachers) if {"ce", "mcmi"} <= {r.name for r in rows} else None
        if isinstance(kd, str):
            parts.append(f"mcmi_vs_ce_kd: {kd}")
        result = {"command": f"python -m {SCRIPT} " + shlex.join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
                  "machine": machine(), "partial": bool(missing or parts), "missing_rows": missing,
                  "missing_parts": parts,
                  "settings": {"dataset": args.dataset, "audit": args.audit, "seeds": args.seeds,
                               "tau_bounds": list(tau_bounds()),
                               "queries": {"strategies": args.queries, "budget": args.budget,
                                           "rounds": args.query_rounds},
                               "accuracy_seeds": args.accuracy_seeds, "reaudit": not args.no_reaudit,
                               "scale": asked},
                  "asked_rows": [r.name for r in rows], "teachers": [teachers[r.name] for r in rows if r.name in teachers],
                  "accuracy_over_teacher_seeds": accuracy, "mcmi_vs_ce_kd": kd}
        result["targets"] = evaluate_targets(result)
        write_results(path, result, markdown)

    write()
    for r in rows:
        if r.name not in teachers:
            teachers[r.name] = measure(work, r, args)
            write()
    for r in rows:  # the MCMI-vs-CE comparison needs both rows' KD students seed by seed
        if {"ce", "mcmi"} <= set(teachers) and r.name in ("ce", "mcmi") and isinstance(mcmi_vs_ce_kd(teachers), str) \
                and not teachers[r.name].get("kd_student_accuracy"):
            print(f"{r.name}: its KD students' per-seed accuracies are not in the kept row: a KD-only audit", flush=True)
            teachers[r.name] = {**teachers[r.name], "kd_student_accuracy": kd_students(work, r, args),
                                "kd_students_from": f"reports/{r.name}-kd"}
            write()
    for m, recipe in modes.items():
        missing = [s for s in range(args.accuracy_seeds) if s not in accuracy[m]["seeds"]]
        if missing:
            measured = seed_runs(work, recipe, missing, args)
            per = {**accuracy[m]["per_seed"], **{k: v["test_accuracy"] for k, v in measured.items()}}
            accuracy[m] = accuracy_entry(m, accuracy[m]["recipe_sha256"], per)
            write()
    print(path.with_suffix(".md").read_text())


def tau_bounds() -> tuple[float, float]:
    from protect.metrics import TAU_BOUNDS

    return TAU_BOUNDS


if __name__ == "__main__":
    main()
