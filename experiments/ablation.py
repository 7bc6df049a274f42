"""CMIM's frontier: teacher accuracy against the largest upper bound of any attack family's gain, for CMIM recipes
(λ, aggregator over T, w(T), the T grid, a λ warm-up: recipes/teachers/cmim-*.toml) beside a CE teacher trained
the same way.

Same machinery and scale options as experiments/protection.py (teachers, audits, shared reference students), so
the rows are directly comparable with it; its job is to choose CMIM's defaults. Every teacher, model and audit is
reused on a rerun. Results: bench/results/ablation-<dataset>.{json,md}.

    python -m experiments.ablation                               # the committed scale (see --help)
    python -m experiments.ablation --variants ce,cmim,cmim-lam20-max --device cuda --jobs 12
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from experiments.audits import produce_rows
from experiments.common import provenance, timing_line, write_results
from experiments.scale import add_audit_args, add_teacher_args, resolve_scale
from experiments.tables import audit_cells, family_table, recipe_line, trained_line
from experiments.teachers import parse_row, valid_recipes

DEFAULT_VARIANTS = "ce,cmim-lam20,cmim-lam40-warm,cmim-lam60-warm"


def markdown(result: dict) -> str:
    s = result["settings"]
    rows = result["variants"]
    ce = rows.get("ce")
    lines = [f"# CMIM frontier: {s['dataset']}", "",
             f"Command: `{result['command']}`  ", f"Machine: {result['machine']}  ", timing_line(result), "",
             f"Teachers `{s['teacher_arch']}`, {s['teacher_epochs']} epochs on {s['train_limit'] or 'all'} training "
             f"rows (seed {s['teacher_seed']}); students `{s['student_arch']}`, {s['student_epochs']} epochs on "
             f"{s['budget']} transfer rows, {s['seeds']} paired seeds, attacks `{s['attacks']}` (kd grid "
             f"`{s['kd_grid']}`). Largest upper = the largest one-sided 95% upper bound of any family's Δ (points): "
             "undistillable needs it ≤ +0.3.", "",
             "| teacher | flags | test acc | Δacc vs CE | ECE | CMI T=1 | CMI T=4 | LS student | largest upper | "
             "strongest (Δ) | outcome |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in sorted(rows.items(), key=lambda kv: -kv[1]["teacher"]["test_accuracy"]):
        t, a = row["teacher"], row["audit"]
        dacc = f"{100 * (t['test_accuracy'] - ce['teacher']['test_accuracy']):+.2f}" if ce else "–"
        ls, up, best = audit_cells(a)
        lines.append(f"| {name} | `{' '.join(row['flags']) or '--mode ce'}` | {100 * t['test_accuracy']:.2f} | {dacc} | "
                     f"{t['ece']:.4f} | {t['cmi']['1']:.4f} | {t['cmi']['4']:.4f} | {ls} | {up} | {best} | "
                     f"{a['outcome']} |")
    lines += trained_line(rows) + recipe_line(rows) + family_table(rows)
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_teacher_args(p)
    add_audit_args(p, audit="default")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help="rows to produce: recipes of recipes/teachers (RECIPE or RECIPE@SEED; `protect list`)")
    p.add_argument("--work", type=Path, default=Path("experiments/work/ablation"))
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args()
    resolve_scale(args)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v.partition("@")[0] not in valid_recipes()]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(valid_recipes())}")
    started = time.time()
    work = args.work / args.dataset
    rows = [parse_row(n, args.teacher_seed) for n in names]
    stem = args.out / f"ablation-{args.dataset}"
    args.out.mkdir(parents=True, exist_ok=True)

    def write(done: dict) -> None:
        result = {**provenance("experiments.ablation", args, started, work), "variants": done}
        write_results(stem.with_suffix(".json"), result, markdown)

    done = produce_rows(work, rows, args, write, "experiments.ablation")
    print(stem.with_suffix(".md").read_text() if done else "no rows")


if __name__ == "__main__":
    main()
