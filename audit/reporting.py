"""The content of report.json: what was asked and answered, the teacher's measured CMI, each family's choice,
accuracies and paired Δ, and the verdict with its statement (`audit.report` renders it as markdown, HTML and a
table)."""
from __future__ import annotations

import datetime as dt
from dataclasses import asdict
from pathlib import Path

import torch

from audit import REPORT_SCHEMA_VERSION
from audit.execution import Outcome, complete
from audit.plan import StudentPlan
from audit.queries.reference import verdict_reference
from audit.queries.summary import add_query_fields
from audit.querying import Answers
from audit.settings import DEFAULT_STUDENT, STUDENT_EPOCHS, STUDENT_SCHEDULE, AuditSettings
from audit.stats import paired_delta, summarise
from protect.defaults import EVAL_TEMPERATURES



def teacher_summary(recovery, y: torch.Tensor, info, num_classes: int) -> dict:
    teacher = {"transfer_agreement": float((recovery.logp.argmax(1) == y).float().mean())}
    if info.policy.get("kind") == "probs" and not recovery.label_only:
        from protect.cmi import cmi_spectrum

        teacher["cmi"] = {f"{t:g}": v for t, v in cmi_spectrum(recovery.logp.double(), y, EVAL_TEMPERATURES,
                                                                num_classes).items()}
        teacher["cmi_note"] = ("on the transfer set, from recovered log-probabilities"
                               + (f"; answers rounded to {info.policy['decimals']} decimals"
                                  if info.policy.get("decimals") is not None else "")
                               + (f"; {recovery.clamped_entries} entries clamped at {recovery.floor:g}"
                                  if recovery.clamped_entries else ""))
    else:
        teacher["cmi"] = {}
        teacher["cmi_note"] = f"not measurable: the endpoint's output policy is {info.policy}"
    return teacher


def _family_entry(plan: StudentPlan, name: str, seeds: int, ls_acc: list[float] | None) -> dict:
    fam = plan.families[name]
    chosen = plan.choice(name)
    scores = plan.validation_scores(name)
    entry: dict = {"attack": name, "candidates": {v.name: {"options": v.options, "validation_accuracy": scores[v.name]}
                                                  for v in fam.candidates},
                   "selected": chosen.name if chosen else None, "selected_on": "validation",
                   "selection_seeds": list(range(plan.selection_seeds)) if len(fam.candidates) > 1 else [],
                   "options": chosen.options if chosen else None}
    records = plan.students(name, seeds)
    entry["students"] = {"trained": len(records), "stopped_early": sum(r.get("stopped_early", False) for r in records),
                         "mean_best_epoch": (sum(r["best_epoch"] for r in records) / len(records)) if records else None}
    acc = complete(plan.accuracies(name, seeds))
    if acc is None:
        entry.update(status="incomplete", accuracy=plan.accuracies(name, seeds))
        return entry
    entry.update(status="ok", accuracy=acc, summary=summarise(acc))
    if ls_acc is not None and name != (verdict_reference(plan) or "ls"):
        entry["delta"] = paired_delta(acc, ls_acc)
    control = complete(plan.accuracies(name, seeds, control=True)) if plan.controls else None
    if control and not fam.reference and fam.needs_soft:
        entry["label_control"] = {"accuracy": control, "delta": paired_delta(acc, control)}
    return entry


def build_report(settings: AuditSettings, answers: Answers, plan: StudentPlan, outcome: Outcome, *,
                 not_run: dict[str, str], tried: set[str], train_rows: int, val_rows: int) -> dict:
    """The report dict: `not_run` are the families the endpoint's answers could not feed (with why), `tried` every
    family the settings selected, `train_rows` and `val_rows` the two parts of the transfer set."""
    from audit.attacks import ATTACKS, BATTERY
    from audit.report import describe_verdict

    seeds, info, dataset, counters = outcome.seeds, answers.info, answers.splits.name, answers.cache.counters
    reference = verdict_reference(plan)
    ls_acc = complete(plan.accuracies(reference, seeds)) if reference else None
    references = {name: _family_entry(plan, name, seeds, ls_acc) for name, f in plan.families.items() if f.reference}
    ls = references.get("ls", {})
    if ls.get("selected"):
        ls["best_epsilon"] = ls["options"]["epsilon"]
    attacks = {name: _family_entry(plan, name, seeds, ls_acc) for name, f in plan.families.items() if not f.reference}
    for name, reason in not_run.items():
        attacks[name] = {"attack": name, "status": "not run", "reason": reason}
    complete_run = not outcome.interrupted and all(e["status"] != "incomplete"
                                                   for e in [*attacks.values(), *references.values()])
    not_tried = [{"attack": a, "reason": "not selected (--attacks)"} for a in BATTERY if a not in tried]
    not_tried += [{"attack": n, "reason": r} for n, r in not_run.items()]
    verdict: dict = {"outcome": None, "undistillable": None, "alpha": settings.alpha,
                     "alpha_per_look": outcome.alpha_look, "looks": outcome.looks, "margin": settings.margin,
                     "units": "percentage points", "seeds": seeds, "families": {}, "strongest_attack": None,
                     "best_delta": None, "seeds_to_decide": None,
                     "reason": "the audit was interrupted before every student finished", "not_tried": not_tried}
    if complete_run and outcome.decision is not None:
        d = outcome.decision.to_dict()
        verdict.update(outcome=d["outcome"], undistillable={"undistillable": True, "distillable": False}.get(d["outcome"]),
                       families=d["families"], strongest_attack=d["strongest"], seeds_to_decide=d["seeds_to_decide"],
                       reason=d["reason"], seeds=d["seeds"],
                       best_delta=d["families"][d["strongest"]]["mean"] if d["strongest"] else None)
    verdict["beyond_labels"] = beyond_labels(attacks, {n: f.needs_soft for n, f in plan.families.items()}) \
        if complete_run else None
    epochs_run = [r.get("epochs_run", 0) for r in plan.store.values() if r.get("val_accuracy") is not None]
    report = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": settings.command,
        "complete": complete_run,
        "oracle": info.to_dict(),
        "dataset": dataset,
        "student": settings.student,
        "training": {"epochs": settings.epochs, "lr": settings.lr, "batch_size": settings.batch_size,
                     "schedule": STUDENT_SCHEDULE, "optimizer": "sgd", "patience": settings.patience,
                     "early_stopping": "best validation epoch kept", "seeds": list(range(seeds)),
                     "kd_grid": settings.kd_grid, "label_controls": settings.label_controls,
                     "val_fraction": settings.val_fraction, "train_rows": train_rows, "val_rows": val_rows,
                     "selection_seeds": settings.selection_seeds, "jobs": outcome.jobs,
                     "worker_deaths": outcome.deaths, "loop": "protect.trainer.fit",
                     "converged": converged_note(settings, dataset, epochs_run)},
        "queries": {"transfer_rows": answers.rows, "asked_this_run": answers.asked,
                    "cached_before_this_run": answers.cached_before, "rows_sent_total": counters["rows_sent"],
                    "requests_total": counters["requests"], "sessions": counters["sessions"]},
        "recovery": answers.recovery.summary(),
        "teacher": teacher_summary(answers.recovery, answers.splits.train_y, info, answers.splits.num_classes),
        "references": references,
        "attacks": attacks,
        "battery": {a: ATTACKS.get(a).summary for a in BATTERY},
        "verdict": verdict,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
    }
    verdict["statement"] = describe_verdict(report)
    add_query_fields(report, plan, seeds, answers.query_entries, settings.budget)  # the statement is made without them
    return report


def converged_note(settings: AuditSettings, dataset: str, epochs_run: list[int]) -> dict:
    """Whether the students trained to the measured plateau: the default recipe is measured for the default
    student on Fashion-MNIST (docs/audit.md); fewer epochs than that stop before it."""
    below = settings.epochs < STUDENT_EPOCHS
    measured = dataset == "fashion-mnist" and settings.student == DEFAULT_STUDENT
    if below:
        text = (f"students trained {settings.epochs} epochs, fewer than the {STUDENT_EPOCHS} measured to reach the "
                "validation plateau: they stopped before it, so Δ measures how fast each recipe learns as much as "
                "what the teacher's answers give")
    elif measured:
        text = (f"{settings.epochs} epochs (the default, {STUDENT_EPOCHS}, is within 0.5 point of a 40-epoch run for "
                "this student and dataset)")
    else:
        text = (f"{settings.epochs} epochs; the plateau was measured for {DEFAULT_STUDENT} on fashion-mnist, not for "
                "this student and dataset")
    return {"before_plateau": below, "measured_for_this_setting": measured, "note": text,
            "max_epochs_run": max(epochs_run, default=0)}


def beyond_labels(attacks: dict[str, dict], needs_soft: dict[str, bool]) -> dict | None:
    """What the soft outputs add over the teacher's labels: each soft family's paired Δ against the `hard-label`
    student (trained on the teacher's argmax). The verdict's Δ is against true labels, so it also counts what the
    labels themselves teach; this isolates the part that output-side training (CMIM) can control."""
    hard = attacks.get("hard-label", {})
    if hard.get("status") != "ok":
        return None
    deltas = {n: paired_delta(e["accuracy"], hard["accuracy"]) for n, e in attacks.items()
              if needs_soft.get(n) and e.get("status") == "ok"}
    if not deltas:
        return None
    best = max(deltas, key=lambda n: deltas[n]["mean"])
    return {"reference": "hard-label", "strongest_attack": best, "best_delta": deltas[best]["mean"],
            "interval": deltas[best]["ci95"], "per_attack": {n: d["mean"] for n, d in deltas.items()}}
