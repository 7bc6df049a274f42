"""Recipes as files: `recipes/teachers/NAME.toml` (what `protect train --config NAME` trains) and
`recipes/audits/NAME.toml` (the audit settings the experiments use), and the hash a run records of its recipe.

A teacher recipe holds `name` (= the file's stem, the name results cite), an optional `description`, and
`protect train` options by their long names with `_` for `-` (`lam_warmup = 0.3`). Keys it leaves out keep
`protect train`'s defaults for the dataset (protect/defaults.py). `init_from` / `reference_from` name the recipe
whose trained run a fine-tune starts from / a Nasty teacher is measured against (the experiments pass its run
directory as `--init` / `--reference`). Where and how a run runs (dataset, seed, device, paths) is not a recipe.

The recipe hash of a run is the sha256 of the canonical JSON of its resolved training settings (everything in
config.json but where and how it ran): two runs with equal hashes were trained by the same recipe, whichever way
(a file or flags) it was given.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from protect.defaults import UsageError

# recipes/ is data at the repository's root, beside the packages (a source checkout or an editable install).
RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
META_KEYS = ("name", "description", "init_from", "reference_from")
# where and how a run runs, never what it trains: a recipe may not set them
RUN_KEYS = frozenset({"out", "seed", "device", "quiet", "json", "data_dir", "download", "resume", "workers", "init",
                      "reference", "config", "dataset"})
# config.json keys that are not training settings: run location, verbosity, provenance, what the data says
_NOT_HASHED = frozenset({"data_dir", "workers", "command", "versions", "recipe", "num_classes", "classes",
                         "input_shape", "normalization", "out", "quiet", "resume"})
_NOT_HASHED_TRAIN = frozenset({"seed", "device"})


class RecipeError(UsageError):
    """A recipe that cannot be found or read; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    values: dict  # the options as written, in file order (what `flags` renders)
    defaults: dict = field(default_factory=dict)  # the same, converted to what argparse would have parsed
    description: str = ""
    init_from: str | None = None
    reference_from: str | None = None

    @property
    def mode(self) -> str:
        return self.defaults.get("mode", "cmim")

    def flags(self) -> list[str]:
        """The recipe's options beside its mode as `protect train` flags, in file order (a readable record of it;
        `--config` is what trains)."""
        out: list[str] = []
        for key, value in self.values.items():
            if key == "mode":
                continue
            flag = "--" + key.replace("_", "-")
            if key == "no_amp" or isinstance(value, bool):
                out += [flag] if value else []
            elif isinstance(value, list):
                out += [flag, ",".join(_number(v) for v in value)]
            else:
                out += [flag, _number(value)]
        return out


def _number(v) -> str:
    return f"{v:g}" if isinstance(v, float | int) and not isinstance(v, bool) else str(v)


def recipes_dir(kind: str) -> Path:
    folder = RECIPES_DIR / kind
    if not folder.is_dir():
        raise RecipeError(f"no recipes folder {folder}: the recipes are files at the repository's root "
                          f"(recipes/{kind}/NAME.toml); run from a clone of the repository, or pass a .toml file")
    return folder


def list_recipes(kind: str) -> list[str]:
    """The recipe names of a kind ("teachers" or "audits"), sorted."""
    return sorted(p.stem for p in recipes_dir(kind).glob("*.toml"))


def recipe_path(kind: str, name_or_path: str | Path) -> Path:
    """A recipe name (recipes/KIND/NAME.toml) or a path to a .toml file."""
    text = str(name_or_path)
    if text.endswith(".toml") or "/" in text:
        path = Path(text)
        if not path.is_file():
            raise RecipeError(f"recipe file {path} not found")
        return path
    path = recipes_dir(kind) / f"{text}.toml"
    if not path.is_file():
        raise RecipeError(f"unknown {kind[:-1]} recipe {text!r}; valid: {', '.join(list_recipes(kind))} "
                          f"(or a path to a .toml file)")
    return path


def read_recipe(kind: str, name_or_path: str | Path) -> tuple[Path, dict]:
    """The file's table, checked for a `name` equal to its stem."""
    path = recipe_path(kind, name_or_path)
    try:
        table = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RecipeError(f"{path}: not a TOML file: {exc}") from exc
    if table.get("name") != path.stem:
        raise RecipeError(f"{path}: `name` must be the file's stem: write name = {path.stem!r} (found "
                          f"{table.get('name')!r}); results cite recipes by this name")
    return path, table


def load_teacher_recipe(name_or_path: str | Path) -> Recipe:
    """A teacher recipe, every key checked against `protect train`'s options."""
    path, table = read_recipe("teachers", name_or_path)
    actions = _train_actions()
    values = {k: v for k, v in table.items() if k not in META_KEYS}
    defaults = {}
    for key, value in values.items():
        if key in RUN_KEYS:
            raise RecipeError(f"{path}: {key!r} says where or how a run runs, not what it trains: remove it and pass "
                              f"--{key.replace('_', '-')} to protect train")
        if key not in actions:
            raise RecipeError(f"{path}: unknown key {key!r}; a recipe sets protect train options by their long "
                              f"name with _ for - (valid: {', '.join(sorted(set(actions) - RUN_KEYS))})")
        defaults[key] = _convert(path, key, value, actions[key])
    meta = {k: table[k] for k in META_KEYS[1:] if k in table}
    if any(not isinstance(v, str) for v in meta.values()):
        raise RecipeError(f"{path}: {', '.join(META_KEYS[1:])} must be strings")
    return Recipe(name=table["name"], path=path, values=values, defaults=defaults, **meta)


def _train_actions() -> dict[str, argparse.Action]:
    from protect.cli import add_train_arguments

    parser = argparse.ArgumentParser(add_help=False)
    add_train_arguments(parser)
    return {a.dest: a for a in parser._actions}


def _convert(path: Path, key: str, value, action: argparse.Action):
    """`value` as argparse would have parsed it from the flag, or a RecipeError that says what to write."""
    def bad(expected: str) -> RecipeError:
        return RecipeError(f"{path}: {key} = {value!r}: expected {expected}")

    if action.nargs == 0:  # store_true / store_false
        if not isinstance(value, bool):
            raise bad(f"true or false ({key} = true)")
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    if isinstance(value, list):
        if not value or not all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in value):
            raise bad("a list of positive numbers")
        value = ",".join(_number(v) for v in value)
    elif isinstance(value, bool) or not isinstance(value, str | int | float):
        raise bad("a string or a number")
    if action.choices is not None and str(value) not in action.choices:
        raise bad(f"one of {', '.join(map(repr, action.choices))} (a string)")
    if action.type is int and not isinstance(value, int):
        raise bad("an integer")
    if action.type is float and not isinstance(value, int | float):
        raise bad(f"a number ({key} = 0.5)")
    try:
        return action.type(str(value)) if action.type else str(value)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        raise bad(f"a value of --{key.replace('_', '-')} ({exc})") from None


def training_settings(config: dict) -> dict:
    """What a run's config.json says it trained, without where and how it ran: `init` / `reference` count as
    whether there is one, not which path."""
    out = {k: v for k, v in config.items() if k not in _NOT_HASHED}
    out["train"] = {k: v for k, v in config.get("train", {}).items() if k not in _NOT_HASHED_TRAIN}
    for key in ("init", "reference"):
        out[key] = config.get(key) is not None
    return out


def _canonical(value):
    """Numbers as floats (a recipe's `lam = 20` and the default 20.0 are one setting), keys sorted by json."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return str(value)


def recipe_hash(settings: dict) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of resolved training settings."""
    text = json.dumps(_canonical(settings), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def config_recipe_hash(config: dict) -> str:
    """The recipe hash of a run from its config.json (any run, also one trained before runs recorded it)."""
    return recipe_hash(training_settings(config))
