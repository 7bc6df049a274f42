"""The options that set an experiment's scale: the teachers' (protect train's defaults for the dataset unless
given) and the audits' (an audit recipe of recipes/audits, which explicit flags override)."""
from __future__ import annotations

import argparse

from protect.defaults import DATASET_DEFAULTS
from protect.recipes import RecipeError, read_recipe

# audit recipe key -> (the experiment's option, its type); the keys are `audit run`'s option names
AUDIT_KEYS: dict[str, tuple[str, type]] = {
    "student": ("student_arch", str), "epochs": ("student_epochs", int), "budget": ("budget", int),
    "queries": ("queries", str), "query_rounds": ("query_rounds", int), "seeds": ("seeds", str),
    "kd_grid": ("kd_grid", str), "attacks": ("attacks", str)}


def add_teacher_args(p: argparse.ArgumentParser, teacher_seed: bool = True) -> None:
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", help="where the dataset's files are (default: the Debian path)")
    p.add_argument("--teacher-arch", help="default: protect train's for the dataset")
    p.add_argument("--teacher-epochs", type=int,
                   help="default: protect train's for the dataset (16 on fashion-mnist); recipes that set their own "
                        "epochs (fine-tunes) keep them")
    if teacher_seed:
        p.add_argument("--teacher-seed", type=int, default=0, help="the seed of rows named without @SEED")
    p.add_argument("--train-limit", type=int, default=0, help="teacher training rows (0 = all)")
    p.add_argument("--parallel-teachers", type=int, default=1, help="teachers trained at once (processes)")
    p.add_argument("--device", default="auto")


def add_audit_args(p: argparse.ArgumentParser, audit: str) -> None:
    """The audits' options; each left out comes from the audit recipe (`--audit`, default `audit`)."""
    p.add_argument("--audit", default=audit, help=f"audit recipe: a name of recipes/audits or a .toml file "
                                                  f"(default {audit}); the options below override it")
    p.add_argument("--student-arch")
    p.add_argument("--student-epochs", type=int, help="default: the audit's (the measured plateau)")
    p.add_argument("--budget", type=int, help="queries per audit (real rows and synthetic ones)")
    p.add_argument("--queries", help="the audit's query strategies, e.g. rows,mixup,boundary")
    p.add_argument("--query-rounds", type=int, help="the audit's --query-rounds")
    p.add_argument("--seeds", help="paired student seeds per audit, or 'auto'")
    p.add_argument("--kd-grid", choices=["quick", "full"])
    p.add_argument("--attacks")
    p.add_argument("--jobs", type=int, help="students trained at once per audit (default: the audit's)")
    p.add_argument("--threads", type=int, help="torch threads per student job (default: the audit's)")
    p.add_argument("--quiet", action="store_true")


def load_audit_recipe(name_or_path: str) -> dict:
    """An audit recipe's settings by the experiment's option names, every key and type checked."""
    try:
        path, table = read_recipe("audits", name_or_path)
    except RecipeError as exc:
        raise SystemExit(str(exc)) from None
    out = {}
    for key, value in table.items():
        if key in ("name", "description"):
            continue
        if key not in AUDIT_KEYS:
            raise SystemExit(f"{path}: unknown key {key!r}; valid: {', '.join(AUDIT_KEYS)} (audit run's option "
                             "names with _ for -)")
        dest, kind = AUDIT_KEYS[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise SystemExit(f"{path}: {key} = {value!r}: expected {'an integer' if kind is int else 'a string'}")
        out[dest] = value
    return out


def resolve_teacher_scale(args: argparse.Namespace) -> None:
    """The teachers' architecture and epochs: protect train's defaults for the dataset where not given."""
    defaults = DATASET_DEFAULTS.get(args.dataset, DATASET_DEFAULTS["imagefolder"])
    args.teacher_arch = args.teacher_arch or defaults["arch"]
    args.teacher_epochs = args.teacher_epochs or defaults["epochs"]
    args.train_limit = args.train_limit or None


def resolve_scale(args: argparse.Namespace) -> None:
    """Every scale option resolved: flags, then the audit recipe, then the audit's own defaults."""
    from audit.runner import AuditSettings

    resolve_teacher_scale(args)
    recipe = load_audit_recipe(args.audit)
    defaults = AuditSettings(dataset=args.dataset, out=None)
    for key, (dest, _) in AUDIT_KEYS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, recipe.get(dest, getattr(defaults, key)))
    args.seeds = str(args.seeds)
