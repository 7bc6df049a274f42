"""Assemble a teacher's training run from CLI options: config, data, model, objective, then `fit`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from protect.cmi import CMIM_DEFAULT_LAMBDA, cmi_spectrum
from protect.data import TensorLoader, load_dataset, make_loader, train_and_test_sets
from protect.defaults import DATASET_DEFAULTS, EVAL_TEMPERATURES, UsageError
from protect.models import create_model
from protect.objectives import OBJECTIVES
from protect.recipes import RecipeError, config_recipe_hash, list_recipes, load_teacher_recipe
from protect.runs import CONFIG, build_model, load_run_model, read_config, versions, write_config
from protect.trainer import TrainConfig, distributed_context, fit, resolve_device


def config_from_args(args: argparse.Namespace) -> dict:
    """The run's config.json: its settings, provenance and the recipe they match (name and hash)."""
    config = settings_from_args(args)
    sha = config_recipe_hash(config)
    config["recipe"] = {"name": matching_recipe(args, sha), "sha256": sha}
    return config


# where and how a run runs: a recipe is matched with this run's values of them
_RUN_ARGS = ("out", "dataset", "seed", "device", "data_dir", "workers", "init", "reference")


def matching_recipe(args: argparse.Namespace, sha: str) -> str:
    """The name of the teacher recipe whose settings, on this run's dataset, hash to `sha`; "custom" if none."""
    from protect.cli import build_parser

    names: list[str | Path] = [args.config] if getattr(args, "config", None) else []
    try:
        names += list_recipes("teachers")
    except RecipeError:  # an install without the repository's recipes/: nothing to match
        pass
    for name in names:
        recipe = load_teacher_recipe(name)
        candidate = build_parser(recipe.defaults).parse_args(["train", "--out", str(args.out)])
        for key in _RUN_ARGS:
            setattr(candidate, key, getattr(args, key))
        try:
            if config_recipe_hash(settings_from_args(candidate)) == sha:
                return recipe.name
        except UsageError:  # e.g. a fine-tuning recipe, and this run has no --init
            continue
    return "custom"


def settings_from_args(args: argparse.Namespace) -> dict:
    OBJECTIVES.get(args.mode)  # unknown mode → the list of valid ones, before any work
    defaults = DATASET_DEFAULTS.get(args.dataset, DATASET_DEFAULTS["imagefolder"])
    if args.mode == "mcmi" and args.init is None:
        raise UsageError("--mode mcmi fine-tunes a trained teacher: pass --init RUN_DIR (e.g. a `--mode ce` run)")
    if args.mode == "nasty" and args.reference is None:
        raise UsageError("--mode nasty needs --reference RUN_DIR, a CE-trained model of the same task")
    if args.mode == "cmim" and args.calibrated and args.exact_centroids:
        raise UsageError("--calibrated and --exact-centroids cannot be combined (the exact pass averages raw logits, "
                         "not calibrated ones): drop one of them")
    if args.mode == "cmim":
        options = {"lam": CMIM_DEFAULT_LAMBDA if args.lam is None else args.lam, "temperatures": args.temperatures,
                   "aggregator": args.aggregator, "weighting": args.weighting,
                   "momentum": args.centroid_momentum, "exact_pass": args.exact_centroids,
                   "lam_warmup": args.lam_warmup, "calibrated": args.calibrated}
    elif args.mode == "mcmi":
        options = {"lam": 0.25 if args.lam is None else args.lam, "momentum": args.centroid_momentum,
                   "exact_pass": args.exact_centroids}
    elif args.mode == "nasty":
        options = {"tau": args.tau, "omega": args.omega}
    elif args.mode == "ls":
        options = {"epsilon": args.epsilon}
    else:
        options = {}
    train = TrainConfig(
        epochs=args.epochs or defaults["epochs"], lr=args.lr or defaults["lr"],
        optimizer=args.optimizer, momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
        warmup_epochs=args.warmup_epochs, batch_size=args.batch_size or defaults["batch_size"], seed=args.seed,
        device=args.device, amp=not args.no_amp, grad_clip=args.grad_clip or None)
    if train.epochs < 1 or train.batch_size < 1 or train.lr <= 0:
        raise UsageError("--epochs and --batch-size must be ≥ 1 and --lr > 0")
    return {"mode": args.mode, "dataset": args.dataset, "data_dir": args.data_dir, "train_limit": args.train_limit,
            "arch": args.arch or defaults["arch"], "objective_options": options, "train": train.to_dict(),
            "init": str(args.init) if args.init else None,
            "reference": str(args.reference) if args.reference else None,
            "workers": args.workers, "command": " ".join(sys.argv), "versions": versions()}


def _load_compatible(run_dir: str, config: dict, role: str) -> torch.nn.Module:
    """A trained model from another run, checked against this run's classes and input shape first."""
    try:
        other = read_config(run_dir)
    except Exception as exc:
        raise UsageError(f"{role} {run_dir}: {exc}") from exc
    for key in ("num_classes", "input_shape"):
        if other.get(key) != config[key]:
            raise UsageError(f"{role} {run_dir} has {key}={other.get(key)} but this run's dataset {config['dataset']} "
                             f"has {key}={config[key]}; use a run trained on the same task")
    model, _ = load_run_model(run_dir)
    return model


def run_training(args: argparse.Namespace) -> dict | None:
    """Train (or resume) a teacher; returns a summary, or None when interrupted."""
    rank, world = distributed_context()
    try:
        summary = _train(args, rank, world)
        if world > 1:
            torch.distributed.barrier()  # no rank tears the group down while another still uses it
        return summary
    finally:
        if world > 1 and torch.distributed.is_initialized():
            # A gloo group left to the interpreter's exit can abort the process (SIGABRT, "terminate called
            # without an active exception") after a successful run: tear it down explicitly.
            torch.distributed.destroy_process_group()


def _train(args: argparse.Namespace, rank: int, world: int) -> dict | None:
    out: Path = args.out
    if args.resume:
        config = read_config(out)
    else:
        if (out / CONFIG).exists():
            raise UsageError(f"{out} already holds a run; add --resume to continue it, or choose another --out")
        config = config_from_args(args)
    splits = load_dataset(config["dataset"], config["data_dir"], download=getattr(args, "download", False))
    splits = splits.subset_train(config["train_limit"])
    config.update(num_classes=splits.num_classes, classes=splits.classes, input_shape=splits.input_shape,
                  normalization={"mean": splits.mean, "std": splits.std})
    c, h, _ = splits.input_shape
    options = dict(config["objective_options"])
    if config["mode"] == "nasty":
        options["reference"] = _load_compatible(config["reference"], config, "--reference")
    # The initial weights follow --seed, so two runs with the same flags train the same model.
    torch.manual_seed(config["train"]["seed"])
    model = create_model(config["arch"], splits.num_classes, c, h) if ":" in config["arch"] else build_model(config)
    if config.get("init") and not args.resume:
        init = _load_compatible(config["init"], config, "--init")
        if type(init) is not type(model) or init.state_dict().keys() != model.state_dict().keys():
            raise UsageError(f"--init {config['init']} is a different architecture; pass --arch {read_config(config['init'])['arch']}")
        model.load_state_dict(init.state_dict())
    objective = OBJECTIVES.get(config["mode"])(splits.num_classes, **options)

    if world > 1:
        torch.distributed.barrier()  # every rank has checked --out before rank 0 writes into it
    if rank == 0 and not args.resume:
        write_config(out, config)
    train_cfg = TrainConfig(**config["train"])
    train_set, test_set = train_and_test_sets(splits)
    if world == 1 and not config.get("workers"):
        # One process, data in memory: batches are cut from tensors already on the training device.
        device = resolve_device(train_cfg.device)
        train_loader = TensorLoader(train_set.tensors, train_cfg.batch_size, shuffle=True, seed=train_cfg.seed,
                                    augment=train_set.augment, device=device)
        test_loader = TensorLoader(test_set.tensors, 1024, shuffle=False, device=device)
    else:
        train_loader = make_loader(train_set, train_cfg.batch_size, shuffle=True, seed=train_cfg.seed,
                                   workers=config.get("workers", 0), distributed=world > 1)
        test_loader = make_loader(test_set, 1024, shuffle=False)

    def epoch_metrics(_model, logits, labels) -> dict:
        cmi = cmi_spectrum(logits, labels, EVAL_TEMPERATURES, splits.num_classes)
        return {"test_cmi": {f"{t:g}": v for t, v in cmi.items()}}

    result = fit(model, objective, train_loader, test_loader, train_cfg, out, resume=args.resume,
                 progress=not getattr(args, "quiet", False), desc=config["mode"], epoch_metrics=epoch_metrics)
    if result.interrupted:
        return None
    last = result.history[-1]
    return {"mode": config["mode"], "dataset": config["dataset"], "arch": config["arch"], "run_dir": str(out),
            "test_accuracy": result.test_accuracy, "rank": rank,
            "test_cmi": {t: last["test_cmi"][t] for t in ("1", "4", "16")}, "epochs": len(result.history)}
