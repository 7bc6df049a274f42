"""A row's measurements: its teacher exported (or recalibrated), its test numbers, and its audit at the experiment's
scale, summarised for the results file. Exports, answer caches and students are reused on a rerun."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from experiments.teachers import Row, run_name, train_teachers
from protect.defaults import CARD_TEMPERATURES
from protect.recipes import config_recipe_hash


def fit_recalibration(model: Path, dataset: str, data_dir: str | None) -> float:
    """τ minimising the NLL of the model's test logits on the first half of the test split (the other half is
    where its ECE is reported), searched in protect.metrics.TAU_BOUNDS like every other temperature fit."""
    from protect.data import load_dataset
    from protect.metrics import fit_temperature
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
    rep = classifier_report(logits, splits.test_y, card.num_classes, temperatures=CARD_TEMPERATURES)
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


def recipe_record(row: Row, run: Path) -> dict:
    """The recipe a row's teacher was trained by: the file's name and the hash of the run's recorded settings."""
    config = json.loads((run / "config.json").read_text())
    return {"name": row.teacher.recipe.name, "sha256": config_recipe_hash(config),
            "matched": (config.get("recipe") or {}).get("name")}


def audit(work: Path, model: Path, name: str, policy: dict | None, args, script: str) -> dict:
    from audit.oracle import OnnxOracle
    from audit.runner import AuditSettings, run_audit

    settings = AuditSettings(dataset=args.dataset, out=work / "reports" / name, student=args.student_arch,
                             attacks=args.attacks, seeds=args.seeds if args.seeds == "auto" else int(args.seeds),
                             epochs=args.student_epochs, budget=args.budget, kd_grid=args.kd_grid,
                             queries=args.queries, query_rounds=args.query_rounds,
                             data_dir=args.data_dir, device=args.device, jobs=args.jobs, threads=args.threads,
                             references=work / "references", progress=not args.quiet,
                             command=f"{script} ({name})")
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


def row_flags(row: Row) -> list[str]:
    """The row's recipe as flags (a readable record), with the run a fine-tune starts from."""
    recipe = row.teacher.recipe
    init = ["--init", f"runs/{run_name(recipe.init_from, row.teacher.seed)}"] if recipe.init_from else []
    return [*recipe.flags(), *init]


def produce_rows(work: Path, rows: list[Row], args, write, script: str) -> dict[str, dict]:
    """Train, export and audit each row in order; `write(rows)` after each one, so a cut-short run keeps its rows."""
    train_teachers(work, [r.teacher for r in rows], args)
    out: dict[str, dict] = {}
    for row in rows:
        run = work / "runs" / row.teacher.run
        temperature = 1.0
        if row.recalibrate:
            temperature = fit_recalibration(export(work, row.teacher.run, run, args), args.dataset, args.data_dir)
        model = export(work, row.model, run, args, temperature)
        started = time.time()
        report = audit(work, model, row.name, row.policy, args, script)
        out[row.name] = {"teacher": teacher_numbers(model, args.dataset, args.data_dir, run),
                         "audit": summarise_audit(report), "recipe": recipe_record(row, run),
                         "policy": row.policy or {"kind": "probs"}, "flags": row_flags(row),
                         "audit_wall_seconds": round(time.time() - started, 1)}
        a = out[row.name]["audit"]
        print(f"{row.name}: teacher {out[row.name]['teacher']['test_accuracy']:.4f}, {a['outcome']} "
              f"(strongest {a['strongest_attack']} {a['best_delta']}, largest upper {a['largest_upper']})", flush=True)
        write(out)
    return out
