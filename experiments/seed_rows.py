"""The protection-over-seeds experiment's teacher entries: a row audited by experiments.audits (or one of another
protection results file) in the results file's schema, and which entries of an earlier file may be kept.

An entry is kept, never recomputed, when its recipe name, recipe hash (protect.recipes), teacher seed and the
experiment's scale (SCALE_KEYS: the dataset, the teachers' scale and the audit's resolved settings) equal what is
asked, and its outcome is decided or was already re-audited with `--seeds auto`.
"""
from __future__ import annotations

import json
from pathlib import Path

from experiments.teachers import Row, asked_settings
from protect.recipes import recipe_hash, training_settings

# What two results must share for a teacher entry of one to stand in the other (the resolved options' names).
SCALE_KEYS = ("dataset", "teacher_arch", "teacher_epochs", "train_limit", "student_arch", "student_epochs", "budget",
              "queries", "query_rounds", "seeds", "kd_grid", "attacks")


def scale(settings: dict) -> dict:
    """The SCALE_KEYS of resolved options (an argparse namespace's vars or a results file's settings)."""
    return {k: (str(settings.get(k)) if k == "seeds" else settings.get(k)) for k in SCALE_KEYS}


def scale_differences(have: dict, asked: dict) -> list[str]:
    return [f"{k} {have.get(k)!r} (asked: {asked[k]!r})" for k in SCALE_KEYS if have.get(k) != asked[k]]


def calibrated_tau(family: dict | None) -> tuple[float | None, str | None]:
    """calibrated-kd's fitted τ (the smallest where it was fitted per seed) and the bound it sits at, if any."""
    t = (family or {}).get("fitted_tau")
    if not t:
        return None, None
    return (t["tau"] if isinstance(t["tau"], float) else min(t["tau"])), t.get("at_bound")


def reference_entry(audit: dict) -> dict:
    """The verdict's label-only reference: its family and its students' mean test accuracy (a fraction), the plain
    LS student's shifted by the reference's measured lead over it."""
    ref = audit.get("reference") or {}
    ls = audit.get("ls_student_accuracy")
    lead = ref.get("test_delta_vs_ls") or 0.0
    return {"name": ref.get("family", "ls"), "accuracy": None if ls is None else ls + lead / 100}


def teacher_entry(row: Row, measured: dict, recipe_sha256: str, kd_accuracy: list[float] | None,
                  audit_seeds: str, source: str) -> dict:
    """One `teachers` entry from a row dict of experiments.audits (`teacher`, `audit`, ...). `kd_accuracy`: the KD
    family's test accuracy per paired seed (fractions), None where only the summary is at hand."""
    a = measured["audit"]
    tau, at_bound = calibrated_tau(a["families"].get("calibrated-kd"))
    kd = a["families"].get("kd") or {}
    return {"row": row.name, "mode": row.teacher.recipe.mode, "recipe": row.teacher.recipe.name,
            "recipe_sha256": recipe_sha256, "seed": row.teacher.seed,
            "test_accuracy": measured["teacher"]["test_accuracy"], "outcome": a["outcome"],
            "largest_upper": a["largest_upper"], "strongest": a["strongest_attack"], "audit_seeds": audit_seeds,
            "seeds": a["seeds"], "calibrated_kd_tau": tau, "calibrated_kd_tau_at_bound": at_bound,
            "reference": reference_entry(a),
            "families": {n: {"queries": f.get("queries", "rows"), "mean": f["mean"], "upper": f["upper"],
                             "p_holm": f["p_holm"]} for n, f in a["families"].items()},
            "kd_student_accuracy": kd_accuracy, "kd_delta_per_seed": kd.get("per_seed"),
            "trained_on": measured["teacher"].get("trained_on"), "source": source}


def kd_accuracies(report_path: Path) -> list[float] | None:
    """The KD family's per-seed test accuracies of an audit report (report.json), None when it has none."""
    try:
        report = json.loads(report_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return (report.get("attacks", {}).get("kd") or {}).get("accuracy")


def finished(entry: dict, reaudit: bool = True) -> bool:
    """Decided, or already given every seed `--seeds auto` would (or no re-audit asked): nothing more to run."""
    return entry.get("outcome") in ("distillable", "undistillable") or entry.get("audit_seeds") == "auto" \
        or (not reaudit and entry.get("outcome") is not None)


def keep_reason(entry: dict | None, row: Row, sha256: str, reaudit: bool = True) -> str | None:
    """Why an earlier entry stands for `row` (None: it does not). The scale was compared for the whole file."""
    if entry is None:
        return None
    if (entry.get("recipe"), entry.get("recipe_sha256"), entry.get("seed")) != (row.teacher.recipe.name, sha256,
                                                                                  row.teacher.seed):
        print(f"{row.name}: the earlier entry was another recipe or seed ({entry.get('recipe')} "
              f"{str(entry.get('recipe_sha256'))[:12]} @{entry.get('seed')}): recomputed", flush=True)
        return None
    if not finished(entry, reaudit):
        print(f"{row.name}: the earlier entry is inconclusive at {entry.get('seeds')} seeds: re-audited", flush=True)
        return None
    return (f"recipe {row.teacher.recipe.name} ({sha256[:12]}), teacher seed {row.teacher.seed} and the scale "
            f"match; {entry['source']}")


def imported_hash(measured: dict, settings: dict, seed: int) -> str | None:
    """The recipe hash of an imported row's teacher: the one its run recorded, or, for a row written before runs
    recorded one, the hash of the `protect train` command its mode and flags make at the file's scale, provided the
    objective options on its model card are that command's (so a default changed since is not taken for it)."""
    recorded = (measured.get("recipe") or {}).get("sha256")
    if recorded or "mode" not in measured.get("teacher", {}):
        return recorded
    flags = [str(f) for f in measured.get("flags", [])]
    argv = ["train", "--mode", measured["teacher"]["mode"], *flags, "--dataset", str(settings.get("dataset")),
            "--arch", str(settings.get("teacher_arch")), "--seed", str(seed), "--out", "imported"]
    if "--epochs" not in flags:
        argv += ["--epochs", str(settings.get("teacher_epochs"))]
    if settings.get("train_limit"):
        argv += ["--train-limit", str(settings["train_limit"])]
    try:
        config = asked_settings(argv)
    except (SystemExit, Exception):  # flags this protect train no longer has: not the same recipe
        return None
    if recipe_hash(config["objective_options"]) != recipe_hash(measured["teacher"].get("options", {})):
        return None
    return recipe_hash(training_settings(config))


def imported_entries(path: Path, rows: list[Row], hashes: dict[str, str], asked: dict,
                     reaudit: bool = True) -> dict[str, dict]:
    """The finished rows of another protection results file (experiments.protection's schema) that match `rows`,
    as teacher entries; a file at another scale is refused, naming the setting."""
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"--import {path}: not a readable results file: {exc}") from None
    if not isinstance(result.get("teachers"), dict):
        raise SystemExit(f"--import {path}: not a results file of experiments.protection (no teachers by row name)")
    differ = scale_differences(scale(result.get("settings", {})), asked)
    if differ:
        raise SystemExit(f"--import {path}: measured at other settings: {', '.join(differ)}; only rows measured "
                         "at the settings asked for can stand in this file")
    default_seed = result["settings"].get("teacher_seed", 0)
    out = {}
    for row in rows:
        measured = result["teachers"].get(row.name)
        if measured is None or row.policy or row.recalibrate:
            continue
        name_seed = int(row.name.partition("@")[2] or default_seed)
        sha = imported_hash(measured, result["settings"], name_seed)
        if name_seed != row.teacher.seed or sha != hashes[row.name]:
            print(f"--import {path}: {row.name} not taken: recipe hash {str(sha)[:12]} at teacher seed {name_seed} "
                  f"(asked: {hashes[row.name][:12]} at {row.teacher.seed})", flush=True)
            continue
        if measured["audit"].get("outcome") is None:
            continue
        entry = teacher_entry(row, measured, sha, None, str(result["settings"].get("seeds")),
                              f"imported from {path.name}")
        if finished(entry, reaudit):
            out[row.name] = entry
        else:
            print(f"--import {path}: {row.name} is inconclusive there: re-audited here", flush=True)
    return out
