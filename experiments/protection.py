"""The protection benchmark: teachers trained to convergence from the recipe files, each audited at the protection
audit recipe (recipes/audits/protection.toml: choices on validation, paired seeds, the three-outcome verdict of
docs/design.md §3).

Rows: a teacher recipe of recipes/teachers (`ce`, `cmim`, `mcmi` fine-tuned from ce, `nasty` against ce, or any
ablation variant), `RECIPE@SEED` for another teacher seed (its run in runs/RECIPE@SEED), or a served row:
`ce-top1` / `ce-round1` (the ce model served with top-1 only / 1 decimal), `cmim-cal` (the cmim model served
temperature-recalibrated). Every step is resumable: finished teachers, exported models, answer caches and
students are reused, and the reference students (LS, CE), which never see a teacher, are trained once for all.
Results: bench/results/protection-<dataset>.{json,md}, rewritten after each row.

    python -m experiments.protection                             # the committed scale (see --help)
    python -m experiments.protection --teachers ce,cmim,cmim@1 --device cuda --jobs 12
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from experiments.audits import produce_rows
from experiments.common import provenance, timing_line, write_results
from experiments.query_strategies import strategy_table
from experiments.scale import add_audit_args, add_teacher_args, resolve_scale
from experiments.tables import audit_cells, family_table, recipe_line, trained_line
from experiments.teachers import SERVED, parse_row

DEFAULT_TEACHERS = "ce,cmim,cmim-cal,mcmi,nasty,ce-top1"
TARGETS = {"seeds_min": 5, "ls_student_min": 0.875, "ce_teacher_min": 0.915, "cmim_accuracy_drop_max_points": 0.3}


def evaluate_targets(rows: dict, seeds_asked) -> list[dict]:
    out = []
    ce, cmim = rows.get("ce"), rows.get("cmim")
    some = next(iter(rows.values()), None)
    if some:
        seeds = some["audit"]["seeds"]
        out.append({"target": f"≥ {TARGETS['seeds_min']} paired seeds", "measured": f"{seeds} seeds",
                    "reached": seeds >= TARGETS["seeds_min"]})
        ls = some["audit"]["ls_student_accuracy"]
        out.append({"target": f"LS student ≥ {100 * TARGETS['ls_student_min']:.1f}% (converged students)",
                    "measured": f"{100 * ls:.2f}%" if ls is not None else "–",
                    "reached": ls is not None and ls >= TARGETS["ls_student_min"]})
    if ce:
        acc = ce["teacher"]["test_accuracy"]
        out.append({"target": f"CE teacher ≥ {100 * TARGETS['ce_teacher_min']:.1f}%", "measured": f"{100 * acc:.2f}%",
                    "reached": acc >= TARGETS["ce_teacher_min"]})
        out.append({"target": "CE distillable (some family significantly > 0 after Holm)",
                    "measured": f"{ce['audit']['outcome']} (strongest {ce['audit']['strongest_attack']}, "
                                f"Δ {ce['audit']['best_delta']:+.2f})", "reached": ce["audit"]["outcome"] == "distillable"})
    if ce and cmim:
        drop = 100 * (ce["teacher"]["test_accuracy"] - cmim["teacher"]["test_accuracy"])
        out.append({"target": "CMIM accuracy ≥ CE − 0.3 points", "measured": f"CE − CMIM = {drop:+.2f} points",
                    "reached": drop <= TARGETS["cmim_accuracy_drop_max_points"]})
    if cmim:
        a = cmim["audit"]
        out.append({"target": "CMIM undistillable (every family's one-sided 95% upper Δ ≤ +0.3)",
                    "measured": f"{a['outcome']} (largest upper bound "
                                f"{a['largest_upper']:+.2f})" if a["largest_upper"] is not None else a["outcome"],
                    "reached": a["outcome"] == "undistillable"})
    mcmi = rows.get("mcmi")
    if ce and mcmi and ce["audit"]["kd_delta"] is not None and mcmi["audit"]["kd_delta"] is not None:
        out.append({"target": "MCMI KD Δ ≥ CE KD Δ (a better teacher for partners)",
                    "measured": f"MCMI {mcmi['audit']['kd_delta']:+.2f} vs CE {ce['audit']['kd_delta']:+.2f} points",
                    "reached": mcmi["audit"]["kd_delta"] >= ce["audit"]["kd_delta"]})
    return out


def markdown(result: dict) -> str:
    s = result["settings"]
    rows = result["teachers"]
    lines = [f"# Protection benchmark: {s['dataset']}", "",
             f"Command: `{result['command']}`  ", f"Machine: {result['machine']}  ", timing_line(result), "",
             f"Teachers: `{s['teacher_arch']}`, {s['teacher_epochs']} epochs on {s['train_limit'] or 'all'} training "
             f"rows (seed {s['teacher_seed']}). Students: `{s['student_arch']}`, the audit's converged recipe "
             f"({s['student_epochs']} epochs, one-cycle, best validation epoch), {s['budget']} transfer rows of which "
             f"10% are the validation slice every choice is made on, {s['seeds']} paired seeds, kd grid "
             f"`{s['kd_grid']}`, attacks `{s['attacks']}`. Δ = knockoff − LS student in points; in brackets the "
             "one-sided 95% upper bound; ✱ = significantly above 0 after Holm.", "",
             "| teacher | test acc | ECE | mean top p | CMI T=1 | CMI T=4 | CMI T=16 | LS student | outcome | "
             "strongest (Δ) | largest upper bound |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        t, a = row["teacher"], row["audit"]
        ls, up, best = audit_cells(a)
        lines.append(f"| {name} | {100 * t['test_accuracy']:.2f} | {t['ece']:.4f} | {t['mean_top_probability']:.3f} | "
                     f"{t['cmi']['1']:.4f} | {t['cmi']['4']:.4f} | {t['cmi']['16']:.5f} | {ls} | "
                     f"**{a['outcome']}** | {best} | {up} |")
    lines += trained_line(rows) + recipe_line(rows)
    lines += ["", "## Targets", "", "| target | measured | reached |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['reached'] else 'no'} |" for t in result["targets"]]
    lines += family_table(rows)
    lines += strategy_table(rows)
    lines += ["", "## Statements", ""] + [f"- **{n}**: {row['audit']['statement']}" for n, row in rows.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_teacher_args(p)
    add_audit_args(p, audit="protection")
    p.add_argument("--teachers", default=DEFAULT_TEACHERS,
                   help=f"rows, in order: recipes of recipes/teachers (RECIPE or RECIPE@SEED) or {', '.join(SERVED)}")
    p.add_argument("--work", type=Path, default=Path("experiments/work/protection"))
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args()
    resolve_scale(args)
    started = time.time()
    work = args.work / args.dataset
    rows = [parse_row(t, args.teacher_seed) for t in args.teachers.split(",") if t]
    stem = args.out / f"protection-{args.dataset}"
    args.out.mkdir(parents=True, exist_ok=True)

    def write(done: dict) -> None:
        result = {**provenance("experiments.protection", args, started, work), "teachers": done,
                  "targets": evaluate_targets(done, args.seeds)}
        write_results(stem.with_suffix(".json"), result, markdown)

    done = produce_rows(work, rows, args, write, "experiments.protection")
    print(stem.with_suffix(".md").read_text() if done else "no rows")


if __name__ == "__main__":
    main()
