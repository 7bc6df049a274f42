"""Recipes as files: `protect train --config` reads them (flags override), runs record {name, sha256}, the hash is
that of the resolved training settings whichever way they were given, and bad files fail naming file and key."""
from __future__ import annotations

import copy
import json

import pytest

from experiments.scale import load_audit_recipe
from experiments.teachers import parse_row
from protect import recipes
from protect.cli import build_parser, with_recipe
from protect.recipes import RecipeError, config_recipe_hash, list_recipes, load_teacher_recipe, recipe_hash
from protect.teacher import config_from_args
from tests.conftest import run_cli


def _config(*argv: str) -> dict:
    """The config.json `protect train ARGV` would write, without training."""
    argv = ["train", *argv] + ([] if "--out" in argv else ["--out", "/tmp/unused-run"])
    return config_from_args(with_recipe(build_parser().parse_args(argv), argv))


def test_config_file_and_mode_flag_record_the_same_recipe_hash_in_their_runs(tmp_path):
    common = ["--dataset", "digits", "--epochs", "1", "--quiet"]
    run_cli("train", "--config", "recipes/teachers/cmim.toml", *common, "--out", str(tmp_path / "file"))
    run_cli("train", "--mode", "cmim", *common, "--out", str(tmp_path / "flags"))
    by_file, by_flags = (json.loads((tmp_path / r / "config.json").read_text()) for r in ("file", "flags"))
    assert by_file["recipe"] == by_flags["recipe"] and len(by_file["recipe"]["sha256"]) == 64
    # the hash is computable from a config.json alone (an old run that recorded none)
    old = {k: v for k, v in by_file.items() if k != "recipe"}
    assert config_recipe_hash(old) == by_file["recipe"]["sha256"]


def test_a_run_at_a_recipes_settings_is_named_by_it_whichever_way_they_were_given():
    assert _config("--mode", "cmim")["recipe"]["name"] == "cmim"
    elsewhere = _config("--config", "cmim", "--seed", "3", "--device", "cpu")
    assert elsewhere["recipe"] == _config("--mode", "cmim")["recipe"]
    assert _config("--mode", "ce")["recipe"]["name"] == "ce"
    lam30 = _config("--config", "cmim", "--lam", "30")["recipe"]
    assert lam30 == _config("--config", "cmim-lam30-T0.25-16-T2-warm")["recipe"]
    assert lam30["name"] == "cmim-lam30-T0.25-16-T2-warm"
    assert _config("--config", "cmim", "--lam", "25")["recipe"]["name"] == "custom"
    assert _config("--mode", "mcmi", "--init", "/x/ce", "--epochs", "5", "--lr", "0.01")["recipe"]["name"] == "mcmi"


def test_flags_override_the_recipe_file():
    config = _config("--config", "cmim-lam20-max", "--aggregator", "mean", "--epochs", "3")
    options = config["objective_options"]
    assert options["aggregator"] == "mean" and options["lam"] == 20.0 and options["temperatures"] == [1, 2, 4, 8, 16]
    assert options["lam_warmup"] == 0 and config["train"]["epochs"] == 3 and config["mode"] == "cmim"


def test_the_hash_ignores_where_and_how_a_run_ran_but_not_what_it_trained():
    config = _config("--config", "cmim")
    moved = copy.deepcopy(config)
    moved.update(data_dir="/elsewhere", workers=4, command="other", versions={}, init=None)
    moved["train"].update(seed=7, device="cuda")
    assert config_recipe_hash(moved) == config_recipe_hash(config)
    changed = copy.deepcopy(config)
    changed["objective_options"]["lam"] = 21.0
    assert config_recipe_hash(changed) != config_recipe_hash(config)
    # numbers are canonical: a recipe's `lam = 20` and the default 20.0 are one setting
    assert recipe_hash({"lam": 20, "t": [1, 2]}) == recipe_hash({"t": [1.0, 2.0], "lam": 20.0})


def test_every_recipe_file_loads_and_the_default_cmim_recipe_is_protects_default():
    names = list_recipes("teachers")
    assert {"ce", "cmim", "mcmi", "nasty", "ls", "cmim-lam20-max", "cmim-lam40-warm"} <= set(names)
    hashes = {n: _config("--config", n, "--init", "/x/ce", "--reference", "/x/ce")["recipe"]["sha256"] for n in names}
    assert len(set(hashes.values())) == len(names), "two recipe files train the same settings"
    assert load_teacher_recipe("mcmi").init_from == "ce" and load_teacher_recipe("nasty").reference_from == "ce"
    assert {"default", "protection"} <= set(list_recipes("audits"))
    assert load_audit_recipe("protection") == {"student_arch": "cnn-tiny", "attacks": "all", "kd_grid": "full",
                                               "seeds": "8", "budget": 28000, "queries": "rows,mixup,boundary",
                                               "query_rounds": 1}


@pytest.mark.parametrize("text, message", [
    ('name = "bad"\nlamda = 20\n', "unknown key 'lamda'"),
    ('name = "bad"\nseed = 1\n', "pass --seed to protect train"),
    ('name = "bad"\nlam = "twenty"\n', "lam = 'twenty': expected"),
    ('name = "bad"\nweighting = 2\n', "weighting = 2: expected one of"),
    ('name = "bad"\ncalibrated = 1\n', "calibrated = 1: expected true or false"),
    ('name = "bad"\nepochs = 2.5\n', "epochs = 2.5: expected an integer"),
    ('name = "other"\n', "write name = 'bad'"),
    ('name = "bad"\nlam = \n', "not a TOML file"),
])
def test_a_bad_recipe_file_names_the_file_the_key_and_the_fix(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(RecipeError, match="bad.toml") as err:
        load_teacher_recipe(path)
    assert message in str(err.value)


def test_the_cli_reports_recipe_errors_as_usage_errors(tmp_path):
    proc = run_cli("train", "--config", "no-such-recipe", "--dataset", "digits", "--out", str(tmp_path / "r"),
                   check=False)
    assert proc.returncode == 2 and "unknown teacher recipe 'no-such-recipe'" in proc.stderr and "cmim" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "r").exists()


def test_a_missing_recipes_folder_says_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.setattr(recipes, "RECIPES_DIR", tmp_path / "recipes")
    with pytest.raises(RecipeError, match="recipes/teachers/NAME.toml"):
        load_teacher_recipe("cmim")
    assert _config("--mode", "cmim")["recipe"]["name"] == "custom"  # nothing to match, training still works


def test_experiment_rows_are_recipes_at_teacher_seeds():
    assert parse_row("cmim").teacher.run == "cmim" and parse_row("cmim@0").name == "cmim"
    row = parse_row("cmim@1")
    assert (row.name, row.teacher.run, row.teacher.seed) == ("cmim@1", "cmim@1", 1)
    served = parse_row("cmim-cal", default_seed=2)
    assert (served.name, served.teacher.run, served.model, served.recalibrate) == ("cmim-cal@2", "cmim@2",
                                                                                   "cmim-cal@2", True)
    assert [t.run for t in parse_row("mcmi@1").teacher.needs()] == ["ce@1"]
    with pytest.raises(SystemExit, match="unknown teacher 'nope'"):
        parse_row("nope")
