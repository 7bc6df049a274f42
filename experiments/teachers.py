"""The teachers an experiment trains: rows named `RECIPE` or `RECIPE@SEED` (a recipe file of recipes/teachers, at a
teacher seed), each trained once into `<work>/runs/RECIPE@SEED` (`runs/RECIPE` at seed 0) by `protect train
--config`, and reused on a rerun only when its recorded settings are the ones asked for.

A row may also serve another row's model differently (SERVED): top-1 only, one decimal, or recalibrated.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from experiments.common import ROOT
from protect.host import cpu_count
from protect.recipes import Recipe, RecipeError, list_recipes, load_teacher_recipe, recipe_hash, training_settings

# name -> the recipe whose model the row serves, and how (the oracle's output policy, or a recalibrated export)
SERVED: dict[str, dict] = {
    "ce-top1": {"model_of": "ce", "policy": {"kind": "topk", "k": 1, "decimals": None}},
    "ce-round1": {"model_of": "ce", "policy": {"kind": "probs", "k": None, "decimals": 1}},
    "cmim-cal": {"model_of": "cmim", "recalibrate": True},
}


@dataclass(frozen=True)
class Teacher:
    """One training run: a recipe at a teacher seed."""

    recipe: Recipe
    seed: int = 0

    @property
    def run(self) -> str:
        return run_name(self.recipe.name, self.seed)

    def needs(self) -> list[Teacher]:
        """The runs this one starts from (`init_from`) or is measured against (`reference_from`), same seed."""
        return [Teacher(load_recipe(n), self.seed) for n in (self.recipe.init_from, self.recipe.reference_from) if n]


@dataclass(frozen=True)
class Row:
    """A results row: the teacher whose model is served, and how it is served."""

    name: str
    teacher: Teacher
    policy: dict | None = None
    recalibrate: bool = False

    @property
    def model(self) -> str:
        """The exported model's directory name (a recalibrated model is an export of its own)."""
        return self.name if self.recalibrate else self.teacher.run


def run_name(base: str, seed: int) -> str:
    return base if seed == 0 else f"{base}@{seed}"


def load_recipe(name: str) -> Recipe:
    try:
        return load_teacher_recipe(name)
    except RecipeError as exc:
        raise SystemExit(str(exc)) from None


def parse_row(text: str, default_seed: int = 0) -> Row:
    """`RECIPE`, `RECIPE@SEED`, or a SERVED name (with an optional `@SEED`), as a Row."""
    base, _, seed_text = text.partition("@")
    try:
        seed = int(seed_text) if seed_text else default_seed
    except ValueError:
        raise SystemExit(f"row {text!r}: the part after @ is a teacher seed (e.g. cmim@1)") from None
    if base in SERVED:
        spec = SERVED[base]
        return Row(run_name(base, seed), Teacher(load_recipe(spec["model_of"]), seed), spec.get("policy"),
                   spec.get("recalibrate", False))
    if base not in valid_recipes():
        raise SystemExit(f"unknown teacher {base!r}; valid: {', '.join([*valid_recipes(), *SERVED])} "
                         "(a recipe of recipes/teachers or a served row, with @SEED for another teacher seed)")
    return Row(run_name(base, seed), Teacher(load_recipe(base), seed))


def valid_recipes() -> list[str]:
    try:
        return list_recipes("teachers")
    except RecipeError as exc:
        raise SystemExit(str(exc)) from None


def train_argv(work: Path, teacher: Teacher, args) -> list[str]:
    """`protect train`'s arguments for a teacher: its recipe file, then the experiment's scale and locations.
    `--teacher-epochs` applies to recipes that do not set their own epochs (fine-tunes do)."""
    argv = ["train", "--config", str(teacher.recipe.path), "--dataset", args.dataset, "--arch", args.teacher_arch,
            "--seed", str(teacher.seed), "--device", args.device, "--quiet"]
    if "epochs" not in teacher.recipe.values:
        argv += ["--epochs", str(args.teacher_epochs)]
    if args.train_limit:
        argv += ["--train-limit", str(args.train_limit)]
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    if teacher.recipe.init_from:
        argv += ["--init", str(work / "runs" / run_name(teacher.recipe.init_from, teacher.seed))]
    if teacher.recipe.reference_from:
        argv += ["--reference", str(work / "runs" / run_name(teacher.recipe.reference_from, teacher.seed))]
    return argv + ["--out", str(work / "runs" / teacher.run)]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _same(a, b) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def asked_settings(argv: list[str]) -> dict:
    """The run config `protect train argv` would record, without training."""
    from protect.cli import build_parser, with_recipe
    from protect.teacher import settings_from_args

    return settings_from_args(with_recipe(build_parser().parse_args(argv), argv))


def asked_recipe_hash(work: Path, teacher: Teacher, args) -> str:
    """The recipe hash (protect.recipes) the teacher's run records once trained at the experiment's scale: what a
    result kept from an earlier session is compared with when the run itself is gone."""
    return recipe_hash(training_settings(asked_settings(train_argv(work, teacher, args))))


def refuse_other_settings(run: Path, argv: list[str]) -> None:
    """Stop when a run kept in the work directory was trained at other settings than `argv` asks for: reusing it
    would report, say, a 12-epoch teacher under a 16-epoch command. Settings a run's config.json does not record
    (options added after it was trained) are not compared."""
    from protect.runs import read_config

    have = read_config(run)
    asked = asked_settings(argv)
    old, new = _flat(training_settings(have)), _flat(training_settings(asked))
    old["seed"], new["seed"] = have["train"].get("seed"), asked["train"]["seed"]
    differ = [f"{k} {old[k]!r} (asked: {new[k]!r})" for k in new if k in old and not _same(old[k], new[k])]
    if differ:
        raise SystemExit(f"{run} was trained with {', '.join(differ)}: pass another --work for these settings, "
                         f"or delete {run} to retrain it")


def train_command(work: Path, teacher: Teacher, args) -> list[str] | None:
    """The `protect train` command of a teacher, or None when it is finished already."""
    run = work / "runs" / teacher.run
    argv = train_argv(work, teacher, args)
    if (run / "config.json").exists():
        refuse_other_settings(run, argv)
    if (run / "model.pt").exists():
        return None
    if (run / "checkpoint.pt").exists():
        return _protect(["train", "--out", str(run), "--resume", "--quiet"])
    return _protect(argv)


def _protect(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "protect.cli", *argv]


def with_needs(teachers: list[Teacher]) -> list[Teacher]:
    """`teachers` and the runs they build on, each once, those built on first."""
    out: list[Teacher] = []
    for t in teachers:
        for n in [*with_needs(t.needs()), t]:
            if n.run not in {o.run for o in out}:
                out.append(n)
    return out


def train_teachers(work: Path, teachers: list[Teacher], args, log_prefix: str = "train-") -> None:
    """Train every teacher (and what it builds on), `--parallel-teachers` at a time, those built on first."""
    order = with_needs(teachers)
    parallel = max(1, getattr(args, "parallel_teachers", 1))
    threads = max(1, cpu_count() // parallel)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}

    def train(teacher: Teacher) -> None:
        cmd = train_command(work, teacher, args)
        if cmd is None:
            return
        log = work / "logs" / f"{log_prefix}{teacher.run}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"training teacher {teacher.run}: {shlex.join(cmd[2:])}", flush=True)
        with open(log, "w") as fh:
            code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
        if code != 0:
            raise SystemExit(f"teacher {teacher.run} failed (exit {code}); see {log}")

    first = [t for t in order if not t.needs()]
    later = [t for t in order if t.needs()]
    for group in (first, later):
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            list(pool.map(train, group))
