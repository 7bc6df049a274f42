"""An audit, start to finish: check the oracle against the dataset, collect (or resume) its answers, train a
student per (attack, seed) and the references with protect's training loop, and summarise (DESIGN §3)."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from audit import REPORT_SCHEMA_VERSION
from audit.attacks import LS_EPSILONS, AttackContext, Variant, expand_attacks, reference_variants
from audit.cache import AnswerCache
from audit.oracle import Oracle, check_compatible, collect_answers
from audit.recover import DEFAULT_FLOOR, recover_logp
from audit.stats import paired_delta, summarise

STUDENTS = "students.jsonl"
CMI_TEMPERATURES = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


class AuditUsageError(ValueError):
    """Bad arguments for an audit (exit status 2)."""


@dataclass
class AuditSettings:
    dataset: str
    student: str
    out: Path
    attacks: str = "all"
    seeds: int = 3
    epochs: int = 4
    budget: int | None = None
    kd_grid: str = "full"
    label_controls: bool = False  # also train each soft attack on one-hot true labels (see docs/audit.md)
    ls_epsilons: tuple[float, ...] = LS_EPSILONS
    data_dir: str | None = None
    lr: float | None = None
    batch_size: int | None = None
    query_batch: int = 1024
    floor: float = DEFAULT_FLOOR
    device: str = "auto"
    progress: bool = True
    command: str = ""

    def training_key(self) -> dict:
        """What makes two students comparable (a student from an earlier session is reused only if equal)."""
        return {"student": self.student, "epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size,
                "floor": self.floor}


def _log(settings: AuditSettings, message: str) -> None:
    if settings.progress:
        print(message, file=sys.stderr, flush=True)


def _student_key(variant: Variant, seed: int, training: dict) -> str:
    blob = json.dumps({"variant": variant.name, "options": variant.options, "seed": seed, **training}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_students(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            out[rec["key"]] = rec
        except (json.JSONDecodeError, KeyError):
            continue  # a line cut short by a crash
    return out


def run_audit(settings: AuditSettings, oracle: Oracle) -> dict:
    """Run (or resume) the audit into `settings.out`; returns the report dict, also written there as
    report.json, report.md and report.html."""
    from protect.cli import DATASET_DEFAULTS
    from protect.data import DictDataset, load_dataset, make_loader
    from protect.models import create_model
    from protect.trainer import TrainConfig, fit

    # Everything that can be refused is checked before the first query.
    if settings.seeds < 1 or settings.epochs < 1:
        raise AuditUsageError("--seeds and --epochs must be ≥ 1")
    variants = expand_attacks(settings.attacks, settings.kd_grid)
    references = reference_variants(settings.ls_epsilons)
    splits = load_dataset(settings.dataset, settings.data_dir)
    defaults = DATASET_DEFAULTS.get(splits.name, DATASET_DEFAULTS["imagefolder"])
    batch_size = settings.batch_size or defaults["batch_size"]
    lr = settings.lr or defaults["lr"]
    settings.batch_size, settings.lr = batch_size, lr
    n_train = len(splits.train_y)
    if settings.budget is not None:
        if settings.budget < batch_size:
            raise AuditUsageError(f"--budget {settings.budget} is smaller than one training batch ({batch_size} rows); "
                                  f"ask for at least {batch_size} rows (the transfer set has {n_train})")
        splits = splits.subset_train(settings.budget)
    rows = len(splits.train_y)
    c, h, _ = splits.input_shape

    info = oracle.metadata()
    check_compatible(info, splits.name, splits.num_classes, splits.input_shape, splits.classes)
    query_batch = min(settings.query_batch, info.max_batch_rows or settings.query_batch)

    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = {"model_sha256": info.model_sha256, "output_policy": info.policy, "dataset": splits.name,
                   "input_shape": splits.input_shape}
    cache = AnswerCache(out, fingerprint, rows, splits.num_classes)
    cached_before = rows - len(cache.missing())
    _log(settings, f"oracle {info.source}: {info.num_classes} classes, policy {info.policy.get('kind')}; "
                   f"transfer set {rows} rows of {splits.name} ({cached_before} cached)")
    raw = splits.train_x.numpy()
    asked = collect_answers(oracle, cache, raw, query_batch, settings.progress)
    answers = cache.read()

    recovery = recover_logp(answers, settings.floor, label_only=True if info.label_only else None)
    teacher_logp = recovery.logp
    y = splits.train_y
    teacher = {"transfer_agreement": float((teacher_logp.argmax(1) == y).float().mean())}
    if info.policy.get("kind") == "probs" and not recovery.label_only:
        from protect.cmi import cmi_spectrum

        teacher["cmi"] = {f"{t:g}": v for t, v in cmi_spectrum(teacher_logp.double(), y, CMI_TEMPERATURES,
                                                                splits.num_classes).items()}
        teacher["cmi_note"] = ("on the transfer set, from recovered log-probabilities"
                               + (f"; answers rounded to {info.policy['decimals']} decimals"
                                  if info.policy.get("decimals") is not None else "")
                               + (f"; {recovery.clamped_entries} entries clamped at {settings.floor:g}"
                                  if recovery.clamped_entries else ""))
    else:
        teacher["cmi"] = {}
        teacher["cmi_note"] = f"not measurable: the endpoint's output policy is {info.policy}"

    runnable = [v for v in variants if not (v.needs_soft and recovery.label_only)]
    not_run = {v.name: "the endpoint answers labels only; this attack needs soft outputs"
               for v in variants if v not in runnable}

    training = settings.training_key()
    identity = {**training, "audit": cache.fingerprint}  # a student is reused only within the same audit
    x_norm = splits.normalise(splits.train_x)
    train_set = DictDataset(x_norm, y, augment=splits.augment, teacher_logp=teacher_logp)
    controls = [v.label_control() for v in runnable if v.needs_soft] if settings.label_controls else []
    labels_logp = recover_logp(np.eye(splits.num_classes, dtype=np.float32)[y.numpy()], settings.floor).logp
    control_set = DictDataset(x_norm, y, augment=splits.augment, teacher_logp=labels_logp)
    test_set = DictDataset(splits.normalise(splits.test_x), splits.test_y)
    test_loader = make_loader(test_set, 1024, shuffle=False)
    store = out / STUDENTS
    done = _read_students(store)
    probe = create_model(settings.student, splits.num_classes, c, h)
    feature_dims = dict(getattr(probe, "feature_dims", {}))
    del probe
    recipes = references + runnable + controls
    results: dict[str, list[float | None]] = {v.name: [None] * settings.seeds for v in recipes}
    interrupted = False
    total = len(recipes) * settings.seeds
    count = 0
    for seed in range(settings.seeds):
        # Both loaders are seeded alike: a control sees the same batches as its attack.
        loaders = {False: make_loader(train_set, batch_size, shuffle=True, seed=seed),
                   True: make_loader(control_set, batch_size, shuffle=True, seed=seed)}
        for variant in recipes:
            count += 1
            key = _student_key(variant, seed, identity)
            if key in done:
                results[variant.name][seed] = done[key]["test_accuracy"]
                continue
            torch.manual_seed(seed)  # same initial student weights for every attack at this seed (paired)
            model = create_model(settings.student, splits.num_classes, c, h)
            objective = variant.build(AttackContext(num_classes=splits.num_classes, feature_dims=feature_dims,
                                                    teacher_logp=labels_logp if variant.control else teacher_logp,
                                                    labels=y, seed=seed))
            cfg = TrainConfig(epochs=settings.epochs, lr=lr, batch_size=batch_size, seed=seed, device=settings.device)
            result = fit(model, objective, loaders[variant.control], test_loader, cfg, progress=settings.progress,
                         desc=f"[{count}/{total}] {variant.name} seed {seed}")
            if result.interrupted:
                interrupted = True
                break
            rec = {"key": key, "variant": variant.name, "attack": variant.attack, "options": objective.options(),
                   "seed": seed, "test_accuracy": result.test_accuracy, "history": result.history, **training}
            with open(store, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            done[key] = rec
            results[variant.name][seed] = result.test_accuracy
            _log(settings, f"{variant.name} seed {seed}: test accuracy {result.test_accuracy:.4f}")
        if interrupted:
            break

    report = build_report(settings, info, splits.name, rows, asked, cached_before, cache.counters, recovery.summary(),
                          teacher, variants, runnable, not_run, results, interrupted)
    from audit.report import write_report

    write_report(report, out)  # report.json, report.md, report.html
    return report


def build_report(settings: AuditSettings, info, dataset: str, rows: int, asked: int, cached_before: int,
                 counters: dict, recovery: dict, teacher: dict, variants: list[Variant], runnable: list[Variant],
                 not_run: dict[str, str], results: dict[str, list], interrupted: bool) -> dict:
    from audit.attacks import ATTACKS, BATTERY, CONTROL_SUFFIX

    def complete(name: str) -> list[float] | None:
        accs = results.get(name)
        return accs if accs is not None and all(a is not None for a in accs) else None

    ls_names = [f"ls-e{e:g}" for e in settings.ls_epsilons]
    ls_means = {n: float(np.mean(complete(n))) for n in ls_names if complete(n)}
    best_ls = max(ls_means, key=ls_means.get) if ls_means else None
    ls_acc = complete(best_ls) if best_ls else None
    references = {
        "ls": {"epsilons": list(settings.ls_epsilons), "best": best_ls,
               "best_epsilon": float(best_ls.split("-e")[1]) if best_ls else None,
               "per_epsilon": {n: results.get(n) for n in ls_names}, "accuracy": ls_acc,
               "summary": summarise(ls_acc) if ls_acc else None},
        "ce": {"accuracy": complete("ce"), "summary": summarise(complete("ce")) if complete("ce") else None,
               "delta_vs_ls": paired_delta(complete("ce"), ls_acc) if complete("ce") and ls_acc else None},
    }
    attacks = {}
    for v in variants:
        entry: dict = {"attack": v.attack, "options": v.options}
        if v.name in not_run:
            entry.update(status="not run", reason=not_run[v.name])
        elif complete(v.name) is None:
            entry.update(status="incomplete", accuracy=results.get(v.name))
        else:
            acc = complete(v.name)
            entry.update(status="ok", accuracy=acc, summary=summarise(acc),
                         delta=paired_delta(acc, ls_acc) if ls_acc else None)
            control = complete(v.name + CONTROL_SUFFIX)
            if control:
                entry["label_control"] = {"accuracy": control, "delta": paired_delta(acc, control)}
        attacks[v.name] = entry
    scored = {n: e["delta"]["mean"] for n, e in attacks.items() if e.get("delta")}
    verdict: dict = {"undistillable": None, "strongest_attack": None, "best_delta": None, "margin": None,
                     "interval": None}
    if scored and not interrupted:
        best = max(scored, key=scored.get)
        d = attacks[best]["delta"]
        verdict.update(undistillable=bool(d["mean"] <= 0), strongest_attack=best, best_delta=d["mean"],
                       margin=-d["mean"], interval=d["ci95"])
        control = attacks[best].get("label_control")
        verdict["strongest_gain_over_label_control"] = control["delta"]["mean"] if control else None
    verdict["beyond_labels"] = None if interrupted else beyond_labels(attacks, {v.name: v.needs_soft for v in variants})
    selected = {v.attack for v in variants}
    not_tried = [{"attack": a, "reason": "not selected (--attacks)"} for a in BATTERY if a not in selected]
    not_tried += [{"attack": n, "reason": r} for n, r in not_run.items()]
    verdict["not_tried"] = not_tried
    verdict["statement"] = _statement(verdict, dataset, settings, rows, len(results.get("ce") or []))
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": settings.command,
        "complete": not interrupted and all(e["status"] != "incomplete" for e in attacks.values()),
        "oracle": info.to_dict(),
        "dataset": dataset,
        "student": settings.student,
        "training": {"epochs": settings.epochs, "lr": settings.lr, "batch_size": settings.batch_size,
                     "seeds": list(range(settings.seeds)), "kd_grid": settings.kd_grid, "optimizer": "sgd",
                     "label_controls": settings.label_controls,
                     "schedule": "cosine", "loop": "protect.trainer.fit"},
        "queries": {"transfer_rows": rows, "asked_this_run": asked, "cached_before_this_run": cached_before,
                    "rows_sent_total": counters["rows_sent"], "requests_total": counters["requests"],
                    "sessions": counters["sessions"]},
        "recovery": recovery,
        "teacher": teacher,
        "references": references,
        "attacks": attacks,
        "battery": {a: ATTACKS.get(a).summary for a in BATTERY},
        "verdict": verdict,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
    }


def beyond_labels(attacks: dict[str, dict], needs_soft: dict[str, bool]) -> dict | None:
    """What the soft outputs add over the teacher's labels: each soft attack's paired Δ against the `hard-label`
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


def _statement(verdict: dict, dataset: str, settings: AuditSettings, rows: int, seeds: int) -> str:
    if verdict["undistillable"] is None:
        return "No verdict: the audit is incomplete or the LS reference could not be trained."
    scope = (f"against the attacks tried (student {settings.student}, {rows} transfer rows of {dataset}, "
             f"{settings.epochs} epochs, {seeds} paired seeds); untried attacks are not covered")
    d = verdict["best_delta"] * 100
    control = verdict.get("strongest_gain_over_label_control")
    if not verdict["undistillable"] and control is not None and control <= 0:
        return (f"DISTILLABLE by the protocol's rule {scope}: {verdict['strongest_attack']} beat the label-smoothing "
                f"student by Δ = {d:+.2f} points, but the same recipe trained on the true labels alone did as well "
                f"({control * 100:+.2f} points for the teacher's answers): the gain is the recipe's, not the teacher's.")
    if verdict["undistillable"]:
        return (f"UNDISTILLABLE {scope}: no knockoff beat the label-smoothing student; the strongest, "
                f"{verdict['strongest_attack']}, reached Δ = {d:+.2f} points (margin {-d:.2f}).")
    return (f"DISTILLABLE {scope}: {verdict['strongest_attack']} beat the label-smoothing student by "
            f"Δ = {d:+.2f} points.")
