"""CMIM ablation (issue 5): λ, temperature grid, aggregator (mean | max) and weighting (1 | T²), each teacher
audited by the attacks that came closest in earlier audits, against a CE teacher trained the same way.

A cheaper scale than bench/protection.py (a smaller teacher on part of the training split, fewer attacks), so
that the settings can be compared side by side within one session; its job is to choose CMIM's defaults, which
the protection benchmark then measures at full scale. Every teacher, model and audit is reused on a rerun.

    python -m bench.ablation                     # the committed CPU scale (see --help)
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.protection import (add_scale_args, audit, delta_cells, export, provenance, summarise_audit,
                             teacher_numbers, timing_line, train_teacher)

# name -> protect-train flags; "ce" is the undefended reference row.
VARIANTS: dict[str, list[str]] = {
    "ce": [],
    "cmim-lam5": ["--lam", "5"],
    "cmim-lam10": ["--lam", "10"],
    "cmim-lam20": ["--lam", "20"],
    "cmim-lam5-max": ["--lam", "5", "--aggregator", "max"],
    "cmim-lam1-T2": ["--lam", "1", "--weighting", "T2"],
    "cmim-lam10-T1-32": ["--lam", "10", "--temperatures", "1,2,4,8,16,32"],
    "cmim-lam2": ["--lam", "2"],
    "cmim-lam0.5-T2": ["--lam", "0.5", "--weighting", "T2"],
    "cmim-lam3-T2": ["--lam", "3", "--weighting", "T2"],
}


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"# CMIM ablation: {s['dataset']}", "",
             f"Command: `{result['command']}`  ", f"Machine: {result['machine']}  ",
             timing_line(result), "",
             f"Teachers `{s['teacher_arch']}`, {s['teacher_epochs']} epochs on {s['train_limit'] or 'all'} training "
             f"rows, teacher seed {s['teacher_seed']}; students `{s['student_arch']}`, {s['student_epochs']} epochs on "
             f"{s['budget']} transfer rows, {s['seeds']} paired seeds; attacks `{s['attacks']}` (kd grid "
             f"`{s['kd_grid']}`). Δ = knockoff − best label-smoothing student, points.", "",
             "| teacher | flags | test acc | CMI T=1 | CMI T=4 | CMI T=16 | best Δ | 95% CI | strongest attack |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in result["variants"].items():
        t, a = row["teacher"], row["audit"]
        best, ci = delta_cells(a)
        lines.append(f"| {name} | `{' '.join(row['flags']) or '--mode ce'}` | {t['test_accuracy'] * 100:.2f} | "
                     f"{t['cmi']['1']:.4f} | {t['cmi']['4']:.4f} | {t['cmi']['16']:.5f} | {best} | {ci} | "
                     f"{a['strongest_attack']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_scale_args(p, teacher_epochs=3, seeds=2, attacks="kd,logit-mse,dkd,logit-std")
    p.add_argument("--variants", default="ce,cmim-lam5,cmim-lam10,cmim-lam20,cmim-lam5-max,cmim-lam1-T2", help=f"rows to produce, of: {', '.join(VARIANTS)}")
    p.add_argument("--work", type=Path, default=Path("bench/work/ablation"))
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args()
    args.train_limit = args.train_limit or None
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
    started = time.time()
    work = args.work / args.dataset
    rows: dict[str, dict] = {}
    for name in args.variants.split(","):
        flags = VARIANTS[name]
        run = train_teacher(work, "ce" if name == "ce" else "cmim", args, flags, name=name)
        model = export(work, run, name)
        report = audit(work, model, name, None, args)
        rows[name] = {"flags": flags, "teacher": teacher_numbers(model, args.dataset), "audit": summarise_audit(report)}
        a = rows[name]["audit"]
        print(f"{name}: teacher {rows[name]['teacher']['test_accuracy']:.4f}, best Δ {a['best_delta']}, "
              f"strongest {a['strongest_attack']}", flush=True)
    result = {**provenance("bench.ablation", args, started, work), "variants": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"ablation-{args.dataset}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
