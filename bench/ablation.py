"""CMIM's frontier (issue 11): teacher accuracy against the largest upper bound of any attack family's gain, for
CMIM settings (λ, aggregator over T, w(T), the T grid, a λ warm-up) beside a CE teacher trained the same way.

Same machinery and scale options as bench/protection.py (teachers, audits, shared reference students), so the
rows are directly comparable with it; its job is to choose CMIM's defaults. Every teacher, model and audit is
reused on a rerun. Results: bench/results/ablation-<dataset>.{json,md}.

    python -m bench.ablation                                     # the committed scale (see --help)
    python -m bench.ablation --variants ce,cmim-lam20,cmim-lam20-max --device cuda --jobs 12
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.protection import (add_scale_args, audit_cells, family_table, produce_rows, provenance, resolve_scale,
                             teacher_spec, timing_line, trained_line)

# The grid and w(T) of CMIM's defaults before the ablation chose T 0.25–16 with w(T) = T²: variants measured then
# keep them, so that their committed rows still describe what a rerun trains.
FORMER_GRID = {"--temperatures": "1,2,4,8,16", "--weighting": "1"}


def _pinned(flags: list[str]) -> list[str]:
    """`flags` plus the former grid's flags that it does not set itself."""
    return flags + [x for k, v in FORMER_GRID.items() if k not in flags for x in (k, v)]


# name -> protect-train flags ("ce" is the undefended reference row).
_VARIANTS: dict[str, list[str] | dict] = {
    "ce": [],
    "cmim-lam20": ["--lam", "20", "--lam-warmup", "0"],
    "cmim-lam40": ["--lam", "40", "--lam-warmup", "0"],
    "cmim-lam60": ["--lam", "60", "--lam-warmup", "0"],
    "cmim-lam10-max": ["--lam", "10", "--aggregator", "max", "--lam-warmup", "0"],
    "cmim-lam20-max": ["--lam", "20", "--aggregator", "max", "--lam-warmup", "0"],
    "cmim-lam20-softmax": ["--lam", "20", "--aggregator", "softmax", "--lam-warmup", "0"],
    "cmim-lam40-warm": ["--lam", "40", "--lam-warmup", "0.3"],
    "cmim-lam60-warm": ["--lam", "60", "--lam-warmup", "0.3"],
    "cmim-lam20-max-warm": ["--lam", "20", "--aggregator", "max", "--lam-warmup", "0.3"],
    "cmim-lam40-T0.5-16": ["--lam", "40", "--temperatures", "0.5,1,2,4,8,16"],
    "cmim-lam2-T2": ["--lam", "2", "--weighting", "T2", "--lam-warmup", "0"],
    "cmim-lam40-exact": ["--lam", "40", "--exact-centroids"],
    # T < 1 in the grid: the attacker's recalibration (calibrated-kd) sharpens a CMIM teacher to τ ≈ 0.2
    "cmim-lam20-T0.25-16-warm": ["--lam", "20", "--lam-warmup", "0.3", "--temperatures", "0.25,0.5,1,2,4,8,16"],
    "cmim-lam40-T0.25-16-warm": ["--lam", "40", "--lam-warmup", "0.3", "--temperatures", "0.25,0.5,1,2,4,8,16"],
    # w(T) = T² keeps the high-T terms (the within-class spread of all logits, which logit-mse regresses on)
    **{f"cmim-lam{lam}-T0.25-16-T2-warm": ["--lam", str(lam), "--lam-warmup", "0.3", "--weighting", "T2",
                                          "--temperatures", "0.25,0.5,1,2,4,8,16"] for lam in (10, 15, 17.5, 20, 30)},
    # CMI at the teacher's calibrated scale: temperatures relative to the NLL-optimal τ, so that shrinking the logits
    # (which calibrated-kd undoes) no longer lowers the term
    "cmim-rel-lam2": ["--calibrated", "--lam", "2", "--lam-warmup", "0.3"],
    "cmim-rel-lam5": ["--calibrated", "--lam", "5", "--lam-warmup", "0.3"],
    # post-hoc hardening: CMIM fine-tuning of the converged CE teacher's weights (flags after the common ones win)
    **{f"cmim-ft-lam{lam}": {"flags": ["--lam", str(lam), "--lam-warmup", "0.2", "--epochs", "6", "--lr", "0.01"],
                             "needs": "ce", "init": True} for lam in (60, 120)},
}
VARIANTS: dict[str, list[str] | dict] = {
    name: v if name == "ce" else {**v, "flags": _pinned(v["flags"])} if isinstance(v, dict) else _pinned(v)
    for name, v in _VARIANTS.items()}
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
    lines += trained_line(rows) + family_table(rows)
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_scale_args(p)
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"rows to produce, of: {', '.join(VARIANTS)}")
    p.add_argument("--mcmi-epochs", type=int, default=5)
    p.add_argument("--work", type=Path, default=Path("bench/work/protection"),
                   help="shared with bench.protection by default: its ce teacher and reference students are reused")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args()
    resolve_scale(args)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
    started = time.time()
    work = args.work / args.dataset
    specs = {n: dict(teacher_spec(n, VARIANTS)) for n in names}
    stem = args.out / f"ablation-{args.dataset}"
    args.out.mkdir(parents=True, exist_ok=True)

    def write(rows: dict) -> None:
        result = {**provenance("bench.ablation", args, started, work), "variants": rows}
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
        stem.with_suffix(".md").write_text(markdown(result))

    rows = produce_rows(work, names, specs, args, write)
    print(stem.with_suffix(".md").read_text() if rows else "no rows")


if __name__ == "__main__":
    main()
