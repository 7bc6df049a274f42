"""The protection benchmark (issue 5): teachers ce, ls, cmim, mcmi, nasty (+ output-side defences on CE),
each audited with the attack battery; results in bench/results/protection-<dataset>.{json,md}.

Every step is resumable: a teacher whose run finished, a model already exported, an audit's cached answers and
its finished students are all reused, so a rerun after a crash or a change of one setting redoes only what is
missing. Output-side defences are audited with the same oracle code, the policy applied to the model's answers.

    python -m bench.protection                       # the committed CPU scale (see --help)
    python -m bench.protection --teacher-arch cnn-medium --teacher-epochs 15 --seeds 3 --kd-grid full --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from audit.oracle import OnnxOracle
from audit.runner import AuditSettings, run_audit
from protect.card import load_card
from protect.cli import main as protect_main
from protect.data import load_dataset
from protect.metrics import classifier_report
from protect.predict import OnnxPredictor

TARGETS = {
    "cmim_accuracy_drop_max_points": 0.3,
    "cmim_best_delta_max": 0.0,
    "cmim_ci_upper_max_points": 0.3,
    "ce_best_delta_min_points": 1.0,
}


def _protect(*argv: str) -> None:
    code = protect_main(list(argv))
    if code != 0:
        raise SystemExit(f"protect {' '.join(argv)} failed with exit status {code}")


def train_teacher(work: Path, mode: str, args, extra: list[str], name: str | None = None) -> Path:
    """Train (or resume, or reuse) the teacher `work/runs/<name or mode>`."""
    run = work / "runs" / (name or mode)
    if (run / "model.pt").exists():
        return run
    common = ["--dataset", args.dataset, "--arch", args.teacher_arch, "--seed", str(args.teacher_seed),
              "--device", args.device, "--quiet"]
    if args.train_limit:
        common += ["--train-limit", str(args.train_limit)]
    resume = ["--resume"] if (run / "checkpoint.pt").exists() else []
    if resume:
        _protect("train", "--out", str(run), "--resume", "--quiet")
    else:
        _protect("train", "--mode", mode, "--epochs", str(args.teacher_epochs if mode != "mcmi" else args.mcmi_epochs),
                 *common, *extra, "--out", str(run))
    return run


def export(work: Path, run: Path, name: str) -> Path:
    model = work / "models" / name
    if not (model / "model.json").exists():
        _protect("export", str(run), "--out", str(model), "--force")
    return model


def audit(work: Path, model: Path, name: str, policy: dict | None, args) -> dict:
    settings = AuditSettings(dataset=args.dataset, student=args.student_arch, out=work / "reports" / name,
                             attacks=args.attacks, seeds=args.seeds, epochs=args.student_epochs, budget=args.budget,
                             kd_grid=args.kd_grid, device=args.device, progress=not args.quiet,
                             command=f"bench.protection ({name})")
    return run_audit(settings, OnnxOracle(model, policy=policy))


def teacher_numbers(model: Path, dataset: str) -> dict:
    card = load_card(model)
    splits = load_dataset(dataset)
    logits = torch.from_numpy(OnnxPredictor(model).logits(splits.test_x.numpy()))
    rep = classifier_report(logits, splits.test_y, card.num_classes, temperatures=(1, 4, 16))
    return {"test_accuracy": rep["accuracy"], "cmi": rep["cmi"], "ncmi": rep["ncmi"], "ece": rep["ece"],
            "mode": card.mode, "options": card.options}


def summarise_audit(report: dict) -> dict:
    v = report["verdict"]
    deltas = {n: e["delta"] for n, e in report["attacks"].items() if e.get("delta")}
    kd = {n: d for n, d in deltas.items() if n.startswith("kd")}
    best_kd = max(kd, key=lambda n: kd[n]["mean"]) if kd else None
    ls = report["references"]["ls"].get("summary") or {}
    return {"verdict": v["undistillable"], "strongest_attack": v["strongest_attack"], "best_delta": v["best_delta"],
            "ci95": v["interval"], "best_kd": best_kd, "best_kd_delta": kd[best_kd]["mean"] if best_kd else None,
            "ls_student_accuracy": ls.get("mean"), "deltas": {n: d["mean"] for n, d in deltas.items()},
            "not_tried": v.get("not_tried"), "queries": report["queries"]["transfer_rows"],
            "beyond_labels": v.get("beyond_labels")}


def evaluate_targets(rows: dict) -> list[dict]:
    out = []
    ce, cmim = rows.get("ce"), rows.get("cmim")
    if ce and cmim:
        drop = (ce["teacher"]["test_accuracy"] - cmim["teacher"]["test_accuracy"]) * 100
        out.append({"target": "CMIM accuracy ≥ CE − 0.3 points", "measured": f"CE − CMIM = {drop:+.2f} points",
                    "reached": drop <= TARGETS["cmim_accuracy_drop_max_points"]})
        a = cmim["audit"]
        if a["best_delta"] is not None:
            upper = a["ci95"][1] * 100
            out.append({"target": "CMIM best Δ ≤ 0 (mean over seeds)",
                        "measured": f"{a['best_delta'] * 100:+.2f} points ({a['strongest_attack']})",
                        "reached": a["best_delta"] <= 0})
            out.append({"target": "CMIM best Δ 95% upper ≤ +0.3", "measured": f"{upper:+.2f} points",
                        "reached": upper <= TARGETS["cmim_ci_upper_max_points"]})
        if ce["audit"]["best_delta"] is not None:
            out.append({"target": "CE best Δ ≥ +1.0 (audit detects a distillable model)",
                        "measured": f"{ce['audit']['best_delta'] * 100:+.2f} points ({ce['audit']['strongest_attack']})",
                        "reached": ce["audit"]["best_delta"] * 100 >= TARGETS["ce_best_delta_min_points"]})
    mcmi = rows.get("mcmi")
    if ce and mcmi and ce["audit"]["best_kd_delta"] is not None and mcmi["audit"]["best_kd_delta"] is not None:
        out.append({"target": "MCMI best KD Δ ≥ CE best KD Δ",
                    "measured": f"MCMI {mcmi['audit']['best_kd_delta'] * 100:+.2f} vs CE {ce['audit']['best_kd_delta'] * 100:+.2f} points",
                    "reached": mcmi["audit"]["best_kd_delta"] >= ce["audit"]["best_kd_delta"]})
    return out


def delta_cells(audit_summary: dict) -> tuple[str, str]:
    """The best Δ and its 95% interval as table cells, in points."""
    a = audit_summary
    best = f"{a['best_delta'] * 100:+.2f}" if a["best_delta"] is not None else "–"
    ci = f"[{a['ci95'][0] * 100:+.2f}, {a['ci95'][1] * 100:+.2f}]" if a["ci95"] else "–"
    return best, ci


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"# Protection benchmark: {s['dataset']}", "",
             f"Command: `{result['command']}`  ", f"Machine: {result['machine']}  ",
             timing_line(result), "",
             f"Teachers: `{s['teacher_arch']}`, {s['teacher_epochs']} epochs on "
             f"{s['train_limit'] or 'all'} training rows; students `{s['student_arch']}`, {s['student_epochs']} epochs "
             f"on {s['budget'] or 'all'} transfer rows, {s['seeds']} paired seeds, kd grid `{s['kd_grid']}`.", "",
             "| teacher | test acc | CMI T=1 | CMI T=4 | CMI T=16 | NCMI | LS student | best Δ (points) | 95% CI | strongest attack | best KD Δ | verdict | best soft Δ vs hard-label |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in result["teachers"].items():
        t, a = row["teacher"], row["audit"]
        best, ci = delta_cells(a)
        verdict = {True: "undistillable", False: "distillable", None: "–"}[a["verdict"]]
        kd = f"{a['best_kd_delta'] * 100:+.2f}" if a["best_kd_delta"] is not None else "–"
        ls = f"{a['ls_student_accuracy'] * 100:.2f}" if a["ls_student_accuracy"] is not None else "–"
        b = a.get("beyond_labels")
        soft = f"{b['best_delta'] * 100:+.2f} ({b['strongest_attack']})" if b else "–"
        lines.append(f"| {name} | {t['test_accuracy'] * 100:.2f} | {t['cmi']['1']:.4f} | {t['cmi']['4']:.4f} | "
                     f"{t['cmi']['16']:.5f} | {t['ncmi']:.4f} | {ls} | {best} | {ci} | {a['strongest_attack']} | {kd} | "
                     f"{verdict} | {soft} |")
    lines += ["", "## Targets", "", "| target | measured | reached |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['reached'] else 'no'} |" for t in result["targets"]]
    lines += ["", "## Attacks that beat the LS student (mean Δ > 0, points)", ""]
    for name, row in result["teachers"].items():
        won = sorted(((d, n) for n, d in row["audit"]["deltas"].items() if d > 0), reverse=True)
        lines.append(f"- {name}: " + (", ".join(f"{n} {d * 100:+.2f}" for d, n in won) or "none"))
    lines += ["", "## Δ per attack (points, mean over seeds)", ""]
    names = sorted({n for row in result["teachers"].values() for n in row["audit"]["deltas"]})
    lines += ["| attack | " + " | ".join(result["teachers"]) + " |", "|---" * (len(result["teachers"]) + 1) + "|"]
    for n in names:
        cells = [f"{row['audit']['deltas'][n] * 100:+.2f}" if n in row["audit"]["deltas"] else "–"
                 for row in result["teachers"].values()]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def add_scale_args(p: argparse.ArgumentParser, **defaults) -> None:
    """The options that set a benchmark's scale (teachers, students, audits), shared by protection and ablation."""
    d = {"teacher_arch": "cnn-small", "teacher_epochs": 4, "train_limit": 20000, "seeds": 3, "attacks": "all",
         **defaults}
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--teacher-arch", default=d["teacher_arch"])
    p.add_argument("--teacher-epochs", type=int, default=d["teacher_epochs"])
    p.add_argument("--teacher-seed", type=int, default=0)
    p.add_argument("--train-limit", type=int, default=d["train_limit"], help="teacher training rows (0 = all)")
    p.add_argument("--student-arch", default="cnn-tiny")
    p.add_argument("--student-epochs", type=int, default=2)
    p.add_argument("--budget", type=int, default=10000, help="transfer rows queried per audit")
    p.add_argument("--seeds", type=int, default=d["seeds"], help="paired student seeds per audit")
    p.add_argument("--kd-grid", default="quick", choices=["quick", "full"])
    p.add_argument("--attacks", default=d["attacks"])
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")


def recorded_seconds(work: Path) -> dict:
    """Training time recorded in the artifacts (teacher epochs, student epochs): the benchmark's real cost even
    when this invocation only reused finished work."""
    teachers = sum(json.loads(line).get("seconds", 0.0) for f in work.glob("runs/*/metrics.jsonl")
                   for line in f.read_text().splitlines() if line.strip())
    students = 0.0
    for f in work.glob("reports/*/students.jsonl"):
        for line in f.read_text().splitlines():
            try:
                students += sum(h.get("seconds", 0.0) for h in json.loads(line)["history"])
            except (json.JSONDecodeError, KeyError):
                continue
    return {"teachers": round(teachers, 1), "students": round(students, 1)}


def provenance(script: str, args: argparse.Namespace, started: float, work: Path) -> dict:
    """command, machine, date and times of a benchmark result."""
    return {"command": f"python -m {script} " + shlex.join(sys.argv[1:]),  # as typed: it reruns as is
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
                       f"torch {torch.__version__}, "
                       f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}",
            "date": time.strftime("%Y-%m-%d"), "wall_seconds": time.time() - started,
            "recorded_training_seconds": recorded_seconds(work),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}


def timing_line(result: dict) -> str:
    rec = result["recorded_training_seconds"]
    return (f"Date: {result['date']}; training time recorded in the artifacts: teachers {rec['teachers'] / 60:.1f} min, "
            f"students {rec['students'] / 60:.1f} min (this invocation: {result['wall_seconds'] / 60:.1f} min wall)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_scale_args(p)
    p.add_argument("--mcmi-epochs", type=int, default=2)
    p.add_argument("--teachers", default="ce,ls,cmim,mcmi,nasty,ce-top1,ce-round1",
                   help="which rows to produce; ce-top1 / ce-round1 are the CE model served with top-1 only / 1 decimal")
    p.add_argument("--cmim-args", default="", help="extra protect-train flags for the CMIM teacher, e.g. '--lam 5'")
    p.add_argument("--work", type=Path, default=Path("bench/work/protection"))
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args()
    args.train_limit = args.train_limit or None
    started = time.time()
    work = args.work / args.dataset
    wanted = [t for t in args.teachers.split(",") if t]
    rows: dict[str, dict] = {}
    runs: dict[str, Path] = {}
    models: dict[str, Path] = {}
    mode_flags = {"ce": [], "ls": [], "cmim": args.cmim_args.split(),
                  "mcmi": lambda: ["--init", str(runs["ce"]), "--lr", "0.01"],
                  "nasty": lambda: ["--reference", str(runs["ce"])]}
    for name in wanted:
        mode = name.split("-")[0]
        if mode not in runs:
            if mode in ("mcmi", "nasty") and "ce" not in runs:
                runs["ce"] = train_teacher(work, "ce", args, [])
            flags = mode_flags[mode]() if callable(mode_flags[mode]) else mode_flags[mode]
            runs[mode] = train_teacher(work, mode, args, flags)
            models[mode] = export(work, runs[mode], mode)
        policy = {"ce-top1": {"kind": "topk", "k": 1, "decimals": None},
                  "ce-round1": {"kind": "probs", "k": None, "decimals": 1}}.get(name)
        report = audit(work, models[mode], name, policy, args)
        rows[name] = {"teacher": teacher_numbers(models[mode], args.dataset), "audit": summarise_audit(report),
                      "policy": policy or {"kind": "probs"}}
        print(f"{name}: teacher {rows[name]['teacher']['test_accuracy']:.4f}, best Δ "
              f"{rows[name]['audit']['best_delta']}, strongest {rows[name]['audit']['strongest_attack']}", flush=True)
    result = {**provenance("bench.protection", args, started, work), "teachers": rows}
    result["targets"] = evaluate_targets(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"protection-{args.dataset}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
