"""The protection benchmark (issue 11): teachers trained to convergence, each audited at the audit's converged
default (choices on validation, ≥ 5 paired seeds, the three-outcome verdict of docs/design.md §3).

Rows: `ce`, `cmim` (required), `mcmi` (fine-tuned from ce), `nasty` (reference ce), `ce-top1` / `ce-round1` (the ce
model served with top-1 only / 1 decimal), `cmim-cal` (the cmim model served temperature-recalibrated), and any
CMIM variant of bench/ablation.py. Every step is resumable: finished teachers, exported models, answer caches and
students are reused, and the reference students (LS, CE), which never see a teacher, are trained once for all.
Results: bench/results/protection-<dataset>.{json,md}, rewritten after each row.

    python -m bench.protection                                   # the committed scale (see --help)
    python -m bench.protection --teachers ce,cmim --seeds 5 --device cuda --jobs 12
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from protect.defaults import DATASET_DEFAULTS

ROOT = Path(__file__).resolve().parents[1]

# name -> (protect mode, protect-train flags, serving policy applied by the oracle, what the row reuses)
TEACHERS: dict[str, dict] = {
    "ce": {"mode": "ce"},
    "ls": {"mode": "ls"},
    "cmim": {"mode": "cmim"},
    "mcmi": {"mode": "mcmi", "needs": "ce", "init": True},
    "nasty": {"mode": "nasty", "needs": "ce"},
    "ce-top1": {"model_of": "ce", "policy": {"kind": "topk", "k": 1, "decimals": None}},
    "ce-round1": {"model_of": "ce", "policy": {"kind": "probs", "k": None, "decimals": 1}},
    "cmim-cal": {"model_of": "cmim", "recalibrate": True},
}
DEFAULT_TEACHERS = "ce,cmim,cmim-cal,mcmi,nasty,ce-top1"

# The teachers are `protect train`'s Fashion-MNIST default (16 epochs, not the ablation's 12; protect/defaults.py says why)
TEACHER_EPOCHS = DATASET_DEFAULTS["fashion-mnist"]["epochs"]

TARGETS = {"seeds_min": 5, "ls_student_min": 0.875, "ce_teacher_min": 0.915, "cmim_accuracy_drop_max_points": 0.3}


def teacher_spec(name: str, variants: dict[str, list[str] | dict]) -> dict:
    """The spec of a row: a predefined teacher or a CMIM variant of bench/ablation.py (`cmim-…`): its flags, or a
    dict with `flags` and, for a fine-tuned variant, `needs` (the run whose weights it starts from) and `init`."""
    if name in TEACHERS:
        return TEACHERS[name]
    if name in variants:
        v = variants[name]
        return {"mode": "ce" if name == "ce" else "cmim", **(v if isinstance(v, dict) else {"flags": v})}
    raise SystemExit(f"unknown teacher {name!r}; valid: {', '.join([*TEACHERS, *variants])}")


def _protect_cmd(*argv: str) -> list[str]:
    return [sys.executable, "-m", "protect.cli", *argv]


def refuse_other_settings(run: Path, wanted: dict) -> None:
    """Stop when a run kept in the work directory was trained at other settings than this invocation asks for:
    reusing it would report, say, a 12-epoch teacher under a 16-epoch command."""
    cfg = json.loads((run / "config.json").read_text())
    have = {"dataset": cfg.get("dataset"), "arch": cfg.get("arch"), "seed": cfg["train"].get("seed"),
            "epochs": cfg["train"].get("epochs"), "train_limit": cfg.get("train_limit")}
    differ = [f"{k} {have[k]!r} (asked: {v!r})" for k, v in wanted.items() if have[k] != v]
    if differ:
        raise SystemExit(f"{run} was trained with {', '.join(differ)}: pass another --work for these settings, "
                         f"or delete {run} to retrain it")


def train_command(work: Path, name: str, spec: dict, args) -> list[str] | None:
    """The `protect train` command of a row's teacher, or None when it is finished already."""
    run = work / "runs" / name
    mode = spec["mode"]
    epochs = args.mcmi_epochs if mode == "mcmi" else args.teacher_epochs
    if (run / "config.json").exists():
        refuse_other_settings(run, {"dataset": args.dataset, "arch": args.teacher_arch, "seed": args.teacher_seed,
                                    "epochs": epochs, "train_limit": args.train_limit})
    if (run / "model.pt").exists():
        return None
    if (run / "checkpoint.pt").exists():
        return _protect_cmd("train", "--out", str(run), "--resume", "--quiet")
    flags = list(spec.get("flags", []))
    if spec.get("init"):  # fine-tunes the weights of the run it needs
        flags += ["--init", str(work / "runs" / spec["needs"])]
    if mode == "mcmi":
        flags += ["--lr", "0.01"]
    if mode == "nasty":
        flags += ["--reference", str(work / "runs" / spec["needs"])]
    common = ["--dataset", args.dataset, "--arch", args.teacher_arch, "--seed", str(args.teacher_seed),
              "--device", args.device, "--epochs", str(epochs), "--quiet"]
    if args.train_limit:
        common += ["--train-limit", str(args.train_limit)]
    if args.data_dir:
        common += ["--data-dir", args.data_dir]
    return _protect_cmd("train", "--mode", mode, *common, *flags, "--out", str(run))


def train_teachers(work: Path, names: list[str], specs: dict[str, dict], args) -> None:
    """Train every teacher the rows need, `--parallel-teachers` at a time (a teacher that others build on first)."""
    own = [n for n in names if "mode" in specs[n]]
    for n in names:
        base = specs[n].get("model_of") or specs[n].get("needs")
        if base and base not in own:
            own.insert(0, base)
            specs.setdefault(base, teacher_spec(base, {}))
    first = [n for n in own if not specs[n].get("needs")]
    later = [n for n in own if specs[n].get("needs")]
    threads = max(1, (os.cpu_count() or 1) // max(1, args.parallel_teachers))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}

    def run(name: str) -> None:
        cmd = train_command(work, name, specs[name], args)
        if cmd is None:
            return
        log = work / "logs" / f"train-{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"training teacher {name}: {shlex.join(cmd[2:])}", flush=True)
        with open(log, "w") as fh:
            code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
        if code != 0:
            raise SystemExit(f"teacher {name} failed (exit {code}); see {log}")

    for group in (first, later):
        with ThreadPoolExecutor(max_workers=max(1, args.parallel_teachers)) as pool:
            list(pool.map(run, group))


def fit_recalibration(model: Path, dataset: str, data_dir: str | None) -> float:
    """τ minimising the NLL of the model's test logits on the first half of the test split (the other half is
    where its ECE is reported), searched in protect.metrics.TAU_BOUNDS like every other temperature fit."""
    from protect.metrics import fit_temperature
    from protect.data import load_dataset
    from protect.predict import OnnxPredictor

    splits = load_dataset(dataset, data_dir)
    half = len(splits.test_y) // 2
    logits = torch.from_numpy(OnnxPredictor(model).logits(splits.test_x[:half].numpy()))
    return fit_temperature(torch.log_softmax(logits.double(), 1), splits.test_y[:half])


def export(work: Path, name: str, run: Path, args, temperature: float = 1.0) -> Path:
    model = work / "models" / name
    if not (model / "model.json").exists():
        from protect.export import export_run

        export_run(run, model, data_dir=args.data_dir, force=True, temperature=temperature)
    return model


def teacher_numbers(model: Path, dataset: str, data_dir: str | None, run: Path | None = None) -> dict:
    """Test accuracy, CMI at T = 1/4/16, NCMI and ECE (on the whole test split and on its second half)."""
    from protect.card import load_card
    from protect.data import load_dataset
    from protect.metrics import classifier_report, expected_calibration_error
    from protect.predict import OnnxPredictor

    card = load_card(model)
    splits = load_dataset(dataset, data_dir)
    logits = torch.from_numpy(OnnxPredictor(model).logits(splits.test_x.numpy()))
    rep = classifier_report(logits, splits.test_y, card.num_classes, temperatures=(1, 4, 16))
    half = len(splits.test_y) // 2
    return {"test_accuracy": rep["accuracy"], "cmi": rep["cmi"], "ncmi": rep["ncmi"], "ece": rep["ece"],
            "ece_second_half": expected_calibration_error(logits[half:], splits.test_y[half:]),
            "mean_top_probability": float(torch.softmax(logits.double(), 1).max(1).values.mean()),
            "mode": card.mode, "options": card.options, "output_temperature": card.output_temperature,
            "trained_on": trained_on(run) if run else "unknown"}


def trained_on(run: Path) -> str:
    """Where a teacher was trained (device, torch, platform), from its run's config."""
    try:
        config = json.loads((run / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "unknown"
    v = config.get("versions", {})
    return f"{config['train'].get('device')}, torch {v.get('torch')}, {v.get('platform')}"


def audit(work: Path, model: Path, name: str, policy: dict | None, args) -> dict:
    from audit.oracle import OnnxOracle
    from audit.runner import AuditSettings, run_audit

    settings = AuditSettings(dataset=args.dataset, out=work / "reports" / name, student=args.student_arch,
                             attacks=args.attacks, seeds=args.seeds if args.seeds == "auto" else int(args.seeds),
                             epochs=args.student_epochs, budget=args.budget, kd_grid=args.kd_grid,
                             queries=args.queries, query_rounds=args.query_rounds,
                             data_dir=args.data_dir, device=args.device, jobs=args.jobs, threads=args.threads,
                             references=work / "references", progress=not args.quiet,
                             command=f"bench.protection ({name})")
    oracle = OnnxOracle(model, policy=policy)
    try:
        return run_audit(settings, oracle)
    finally:
        oracle.close()


def summarise_audit(report: dict) -> dict:
    """What the results keep of an audit: the outcome, the LS student, and every family's Δ with its bounds."""
    v = report["verdict"]
    ls = report["references"]["ls"]
    families = {}
    for name, f in (v.get("families") or {}).items():
        e = report["attacks"][name]
        families[name] = {"selected": e.get("selected"), "queries": e.get("queries", "rows"), "cost": e.get("cost"),
                          "fitted_tau": e.get("fitted_tau"), "mean": f["mean"], "upper": f["upper"], "lower": f["lower"],
                          "p_holm": f["p_holm"], "per_seed": f["per_seed"], "distillable": f["distillable"],
                          "within_margin": f["within_margin"],
                          "candidates": {c: x["validation_accuracy"] for c, x in (e.get("candidates") or {}).items()}}
    kd = families.get("kd")
    return {"outcome": v["outcome"], "statement": v["statement"], "strongest_attack": v["strongest_attack"],
            "best_delta": v["best_delta"], "largest_upper": max((f["upper"] for f in families.values()
                                                                 if f["upper"] is not None), default=None),
            "seeds": v["seeds"], "seeds_to_decide": v["seeds_to_decide"], "alpha": v["alpha_per_look"],
            "margin": v["margin"], "ls_student_accuracy": (ls.get("summary") or {}).get("mean"),
            "ls_epsilon": ls.get("best_epsilon"),
            "ce_student_accuracy": (report["references"].get("ce", {}).get("summary") or {}).get("mean"),
            "families": families, "kd_delta": kd["mean"] if kd else None,
            "not_tried": v.get("not_tried"), "queries": report["queries"]["transfer_rows"],
            "transfer_agreement": report["teacher"]["transfer_agreement"], "served_cmi": report["teacher"].get("cmi"),
            "beyond_labels": v.get("beyond_labels"), "converged": report["training"]["converged"],
            "reference": v.get("reference"),
            # what each strategy asked, not what this invocation asked (a rerun that reuses everything is equal)
            "query_strategies": {n: {k: e[k] for k in ("queries", "recipe", "rounds", "epochs", "rows_per_epoch",
                                                       "adaptive") if k in e}
                                 for n, e in (report["queries"].get("strategies") or {}).items()},
            "query_budget": report["queries"].get("budget")}


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


def audit_cells(a: dict) -> tuple[str, str, str]:
    """(LS student accuracy %, largest upper bound, strongest family with its Δ) of an audit summary, as cells."""
    ls = f"{100 * a['ls_student_accuracy']:.2f}" if a["ls_student_accuracy"] is not None else "–"
    up = f"{a['largest_upper']:+.2f}" if a["largest_upper"] is not None else "–"
    best = f"{a['strongest_attack']} ({a['best_delta']:+.2f})" if a["best_delta"] is not None else "–"
    return ls, up, best


def _cell(f: dict | None) -> str:
    if not f:
        return "–"
    mark = " ✱" if f["distillable"] else ""
    return f"{f['mean']:+.2f} (≤ {f['upper']:+.2f}){mark}" if f["upper"] is not None else f"{f['mean']:+.2f}"


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
    lines += trained_line(rows)
    lines += ["", "## Targets", "", "| target | measured | reached |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['reached'] else 'no'} |" for t in result["targets"]]
    lines += family_table(rows)
    from bench.query_strategies import strategy_table

    lines += strategy_table(rows)
    lines += ["", "## Statements", ""] + [f"- **{n}**: {row['audit']['statement']}" for n, row in rows.items()]
    return "\n".join(lines) + "\n"


def trained_line(rows: dict[str, dict]) -> list[str]:
    trained = {row["teacher"].get("trained_on", "unknown") for row in rows.values()}
    return ["", "Teachers trained on: " + "; ".join(sorted(trained)) + "."]


def family_table(rows: dict[str, dict]) -> list[str]:
    """Markdown lines: every family's Δ and upper bound per row, and KD's choice on validation."""
    names = list(dict.fromkeys(f for row in rows.values() for f in row["audit"]["families"]))
    lines = ["", "## Δ per attack family (points: mean over seeds, one-sided 95% upper bound; ✱ = significantly "
             "above 0 after Holm; the KD point chosen on validation in the last row)", "",
             "| family | " + " | ".join(rows) + " |", "|---" * (len(rows) + 1) + "|"]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(_cell(row["audit"]["families"].get(n)) for row in rows.values()) + " |")
    kd = [row["audit"]["families"].get("kd", {}).get("selected") or "–" for row in rows.values()]
    return lines + ["| kd choice | " + " | ".join(kd) + " |"]


def add_scale_args(p: argparse.ArgumentParser, **defaults) -> None:
    """The options that set a benchmark's scale (teachers, students, audits), shared by protection and ablation."""
    d = {"teacher_arch": "cnn-small", "teacher_epochs": 12, "train_limit": 0, "seeds": "5", "attacks": "all",
         "kd_grid": "full", **defaults}
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", help="where the dataset's files are (default: the Debian path)")
    p.add_argument("--teacher-arch", default=d["teacher_arch"])
    p.add_argument("--teacher-epochs", type=int, default=d["teacher_epochs"])
    p.add_argument("--teacher-seed", type=int, default=0)
    p.add_argument("--train-limit", type=int, default=d["train_limit"], help="teacher training rows (0 = all)")
    p.add_argument("--parallel-teachers", type=int, default=1, help="teachers trained at once (processes)")
    p.add_argument("--student-arch", default="cnn-tiny")
    p.add_argument("--student-epochs", type=int, default=None, help="default: the audit's (the measured plateau)")
    p.add_argument("--budget", type=int, default=10000, help="queries per audit (real rows and synthetic ones)")
    p.add_argument("--queries", default="rows", help="the audit's query strategies, e.g. rows,mixup,boundary")
    p.add_argument("--query-rounds", type=int, default=1, help="the audit's --query-rounds")
    p.add_argument("--seeds", default=d["seeds"], help="paired student seeds per audit, or 'auto'")
    p.add_argument("--kd-grid", default=d["kd_grid"], choices=["quick", "full"])
    p.add_argument("--attacks", default=d["attacks"])
    p.add_argument("--jobs", type=int, help="students trained at once per audit (default: the audit's)")
    p.add_argument("--threads", type=int, help="torch threads per student job (default: the audit's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")


def resolve_scale(args: argparse.Namespace) -> None:
    from audit.runner import STUDENT_EPOCHS

    args.train_limit = args.train_limit or None
    args.student_epochs = args.student_epochs or STUDENT_EPOCHS


def recorded_seconds(work: Path) -> dict:
    """Training time recorded in the artifacts (teacher epochs, student epochs): the benchmark's real cost even
    when this invocation only reused finished work."""
    teachers = sum(json.loads(line).get("seconds", 0.0) for f in work.glob("runs/*/metrics.jsonl")
                   for line in f.read_text().splitlines() if line.strip())
    students = 0.0
    for f in [*work.glob("reports/*/students.jsonl"), *work.glob("references/students.jsonl")]:
        for line in f.read_text().splitlines():
            try:
                students += sum(h.get("seconds", 0.0) for h in json.loads(line).get("history", []))
            except (json.JSONDecodeError, AttributeError):
                continue
    return {"teachers": round(teachers, 1), "students": round(students, 1)}


def machine() -> str:
    gpu = f"CUDA {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {gpu}"


def provenance(script: str, args: argparse.Namespace, started: float, work: Path) -> dict:
    """command, machine, date and times of a benchmark result."""
    return {"command": f"python -m {script} " + shlex.join(sys.argv[1:]),  # as typed: it reruns as is
            "machine": machine(), "date": time.strftime("%Y-%m-%d"), "wall_seconds": time.time() - started,
            "recorded_training_seconds": recorded_seconds(work),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}


def timing_line(result: dict) -> str:
    rec = result["recorded_training_seconds"]
    return (f"Date: {result['date']}; training time recorded in the artifacts: teachers {rec['teachers'] / 60:.1f} min, "
            f"students {rec['students'] / 60:.1f} min (this invocation: {result['wall_seconds'] / 60:.1f} min wall)")


def produce_rows(work: Path, names: list[str], specs: dict[str, dict], args, write) -> dict[str, dict]:
    """Train, export and audit each row in order; `write(rows)` after each one, so a cut-short run keeps its rows."""
    train_teachers(work, names, specs, args)
    rows: dict[str, dict] = {}
    for name in names:
        spec = specs[name]
        base = spec.get("model_of", name)
        temperature = 1.0
        if spec.get("recalibrate"):
            temperature = fit_recalibration(export(work, base, work / "runs" / base, args), args.dataset, args.data_dir)
        model = export(work, name if spec.get("recalibrate") else base, work / "runs" / base, args, temperature)
        started = time.time()
        report = audit(work, model, name, spec.get("policy"), args)
        flags = [*spec.get("flags", []), *(["--init", f"runs/{spec['needs']}"] if spec.get("init") else [])]
        rows[name] = {"teacher": teacher_numbers(model, args.dataset, args.data_dir, work / "runs" / base),
                      "audit": summarise_audit(report),
                      "policy": spec.get("policy") or {"kind": "probs"}, "flags": flags,
                      "audit_wall_seconds": round(time.time() - started, 1)}
        a = rows[name]["audit"]
        print(f"{name}: teacher {rows[name]['teacher']['test_accuracy']:.4f}, {a['outcome']} "
              f"(strongest {a['strongest_attack']} {a['best_delta']}, largest upper {a['largest_upper']})", flush=True)
        write(rows)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_scale_args(p, teacher_epochs=TEACHER_EPOCHS)
    p.add_argument("--mcmi-epochs", type=int, default=5)
    p.add_argument("--teachers", default=DEFAULT_TEACHERS, help=f"rows, in order, of: {', '.join(TEACHERS)} or a "
                                                                "CMIM variant of bench/ablation.py")
    p.add_argument("--work", type=Path, default=Path("bench/work/protection"))
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args()
    resolve_scale(args)
    from bench.ablation import VARIANTS

    started = time.time()
    work = args.work / args.dataset
    names = [t for t in args.teachers.split(",") if t]
    specs = {n: dict(teacher_spec(n, VARIANTS)) for n in names}
    stem = args.out / f"protection-{args.dataset}"
    args.out.mkdir(parents=True, exist_ok=True)

    def write(rows: dict) -> None:
        result = {**provenance("bench.protection", args, started, work), "teachers": rows,
                  "targets": evaluate_targets(rows, args.seeds)}
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
        stem.with_suffix(".md").write_text(markdown(result))

    rows = produce_rows(work, names, specs, args, write)
    print(stem.with_suffix(".md").read_text() if rows else "no rows")


if __name__ == "__main__":
    main()
