"""`protect`: train CMIM / MCMI / baseline teachers, evaluate them (CMI, NCMI, ECE), export them to ONNX."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from protect.defaults import DATASET_DEFAULTS, EVAL_TEMPERATURES, UsageError  # noqa: F401  (re-exported: `from protect.cli import ...`)
from protect.registry import UnknownNameError

EXIT_USAGE = 2

TRAIN_EPILOG = """\
modes:
  ce      cross-entropy baseline
  ls      label smoothing (--epsilon)
  cmim    CE + λ·A_T[w(T)·CMI_T]: concentrates each class's outputs at every temperature so that
          knockoff students learn nothing beyond labels (undistillable)
  mcmi    CE − λ·CMI_1, fine-tuning a trained teacher (--init RUN) to help partners' students
  nasty   Nasty Teacher: CE − ω·τ²·KL(teacher ‖ reference), reference = a CE run (--reference RUN)

examples:
  protect train --mode cmim --dataset fashion-mnist --out runs/cmim
  protect train --config cmim --seed 1 --out runs/cmim@1     # a recipe file (recipes/teachers/cmim.toml)
  protect train --mode cmim --lam 5 --temperatures 1,2,4,8,16 --aggregator max --weighting 1 --out runs/cmim-max
  protect train --mode mcmi --init runs/ce --epochs 5 --lr 0.01 --out runs/mcmi
  protect train --mode cmim --init runs/ce --lam 60 --epochs 6 --lr 0.01 --out runs/cmim-ft   # harden a trained model
  torchrun --nproc_per_node 2 --no-python protect train --mode cmim --dataset digits --out runs/ddp
  protect train --out runs/cmim --resume        # continue after Ctrl-C or a crash
"""


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"temperatures must be positive numbers, got {text!r}")
    return values


def add_train_arguments(t: argparse.ArgumentParser) -> None:
    """`protect train`'s options (also what a teacher recipe file may set)."""
    from protect.cmi import CMIM_DEFAULT_LAMBDA, CMIM_DEFAULT_TEMPERATURES, CMIM_DEFAULT_WARMUP, CMIM_DEFAULT_WEIGHTING
    from protect.data import DATASETS
    from protect.models import ARCHS
    from protect.objectives import OBJECTIVES

    t.add_argument("--config", help="a teacher recipe: a name from `protect list` (recipes/teachers/NAME.toml) "
                   "or a .toml file; it sets the defaults, flags given here override it")
    t.add_argument("--mode", default="cmim", help=f"objective: {', '.join(OBJECTIVES.names())} (default cmim)")
    t.add_argument("--dataset", default="fashion-mnist", help=f"{', '.join(DATASETS.names())} (default fashion-mnist)")
    t.add_argument("--data-dir", help="where the dataset's files are (default: the Debian path for fashion-mnist)")
    t.add_argument("--download", action="store_true", help="download the dataset with torchvision (needs a network)")
    t.add_argument("--train-limit", type=int, help="use only the first N training rows (quick experiments)")
    per_dataset = "; ".join(f"{name} {d['arch']}, {d['epochs']} epochs" for name, d in DATASET_DEFAULTS.items())
    t.add_argument("--arch", help=f"{', '.join(ARCHS.names())}, or module:factory (default per dataset: {per_dataset})")
    t.add_argument("--out", required=True, type=Path, help="run directory (config.json, metrics.jsonl, checkpoints)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g = t.add_argument_group("optimisation (defaults per dataset)")
    g.add_argument("--epochs", type=int, help="default per dataset (see --arch)")
    g.add_argument("--lr", type=float)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "adamw"])
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--schedule", default="cosine", choices=["cosine", "step", "none"])
    g.add_argument("--warmup-epochs", type=float, default=0.0)
    g.add_argument("--grad-clip", type=float, default=5.0, help="max gradient norm (0 disables)")
    g.add_argument("--seed", type=int, default=0,
                   help="seeds the initial weights and the data order: the same flags and seed train the same model "
                        "on the same machine")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on CUDA")
    g.add_argument("--workers", type=int, default=0, help="data-loader worker processes (data is in memory)")
    c = t.add_argument_group("cmim / mcmi")
    c.add_argument("--lam", type=float, help=f"λ: CMI weight (cmim default {CMIM_DEFAULT_LAMBDA:g}, mcmi default 0.25)")
    c.add_argument("--temperatures", type=_floats, default=list(CMIM_DEFAULT_TEMPERATURES),
                   help="cmim temperature grid, comma-separated (default "
                        f"{','.join(f'{t:g}' for t in CMIM_DEFAULT_TEMPERATURES)}; T < 1 covers an attacker who "
                        "sharpens the answers)")
    c.add_argument("--aggregator", default="mean", choices=["mean", "max", "softmax"],
                   help="how CMI over the grid is combined: mean (paper), max / softmax (worst case over T)")
    c.add_argument("--weighting", default=CMIM_DEFAULT_WEIGHTING, choices=["1", "T2"],
                   help=f"w(T): 1 or T2 = T² (keeps high T from vanishing; default {CMIM_DEFAULT_WEIGHTING})")
    c.add_argument("--centroid-momentum", type=float, default=0.9, help="EMA momentum of the class centroids")
    c.add_argument("--exact-centroids", action="store_true", help="recompute exact class centroids at each epoch start")
    c.add_argument("--lam-warmup", type=float, default=CMIM_DEFAULT_WARMUP,
                   help=f"cmim: ramp λ linearly from 0 over this fraction of the epochs (default {CMIM_DEFAULT_WARMUP:g}; "
                        "0: full λ from the start)")
    c.add_argument("--calibrated", action="store_true",
                   help="cmim: the grid's temperatures are relative to the model's calibration temperature (fitted on "
                        "each batch's labels, as an attacker would), so the term cannot be met by shrinking the logits")
    c.add_argument("--init", type=Path, help="start from this run's trained weights (fine-tune): required by mcmi; "
                   "with cmim, hardens an existing model")
    n = t.add_argument_group("nasty / ls")
    n.add_argument("--reference", type=Path, help="nasty: run directory of a CE-trained reference model")
    n.add_argument("--tau", type=float, default=4.0, help="nasty: temperature τ")
    n.add_argument("--omega", type=float, default=0.04, help="nasty: weight ω")
    n.add_argument("--epsilon", type=float, default=0.1, help="ls: smoothing ε")
    t.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser(train_defaults: dict | None = None) -> argparse.ArgumentParser:
    """The CLI; `train_defaults` (a recipe's options, protect/recipes.py) replace `protect train`'s defaults, so
    that flags given on the command line still win."""
    parser = argparse.ArgumentParser(prog="protect", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a teacher", epilog=TRAIN_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(t)
    if train_defaults:
        t.set_defaults(**train_defaults)
    t.add_argument("--json", action="store_true", help="print the final summary as JSON")

    e = sub.add_parser("eval", help="accuracy, CMI per temperature, separation, NCMI and ECE on the test split")
    e.add_argument("path", type=Path, help="a run directory or an exported model directory")
    e.add_argument("--dataset", help="dataset to evaluate on (default: the one the model was trained on)")
    e.add_argument("--data-dir")
    e.add_argument("--temperatures", type=_floats, default=list(EVAL_TEMPERATURES))
    e.add_argument("--json", action="store_true", help="machine-readable output")

    x = sub.add_parser("export", help="export a run to model.onnx + model.json (checks ONNX/torch parity)")
    x.add_argument("run_dir", type=Path)
    x.add_argument("--out", required=True, type=Path, help="model directory to write")
    x.add_argument("--data-dir")
    x.add_argument("--force", action="store_true", help="replace an existing model directory")
    x.add_argument("--temperature", type=float, default=1.0,
                   help="serve logits / T: a temperature-recalibrated model (T < 1 sharpens, > 1 softens; accuracy "
                        "is unchanged). Default 1")

    sub.add_parser("list", help="list modes, datasets and architectures")
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from protect import teacher

    summary = teacher.run_training(args)
    if summary is None:
        return 130
    if args.json:
        print(json.dumps(summary, indent=2))
    elif summary.get("rank", 0) == 0:
        cmi = " ".join(f"T={t}: {v:.4f}" for t, v in summary["test_cmi"].items())
        print(f"{summary['mode']} teacher on {summary['dataset']}: test accuracy {summary['test_accuracy']:.4f}; "
              f"CMI {cmi}; run in {summary['run_dir']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from protect.data import load_dataset
    from protect.metrics import classifier_report
    from protect.predict import load_predictor

    predictor = load_predictor(args.path)
    card = predictor.card
    splits = load_dataset(args.dataset or card.dataset, args.data_dir)
    if splits.input_shape != list(card.input_shape) or splits.num_classes != card.num_classes:
        raise UsageError(f"{args.path} expects inputs {card.input_shape} and {card.num_classes} classes; dataset "
                         f"{splits.name} has {splits.input_shape} and {splits.num_classes}")
    logits = torch.from_numpy(predictor.logits(splits.test_x.numpy()))
    report = {"path": str(args.path), "dataset": splits.name, "mode": card.mode,
              **classifier_report(logits, splits.test_y, card.num_classes, args.temperatures)}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.path} ({card.mode}, {card.arch}) on {splits.name} test split ({report['rows']} rows)")
        print(f"  accuracy    {report['accuracy']:.4f}")
        print(f"  ECE         {report['ece']:.4f}")
        print(f"  separation  {report['separation']:.4f}   NCMI (T=1) {report['ncmi']:.4f}")
        for t, v in report["cmi"].items():
            print(f"  CMI T={t:<5} {v:.6f}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from protect.export import export_run

    card = export_run(args.run_dir, args.out, data_dir=args.data_dir, force=args.force, temperature=args.temperature)
    print(f"exported {args.run_dir} → {args.out} (test accuracy {card['test_accuracy']:.4f}, "
          f"ONNX/torch max |Δp| {card['parity_max_abs_diff']:.1e}, sha256 {card['onnx_sha256'][:16]}…)")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from protect.data import DATASETS
    from protect.models import ARCHS
    from protect.objectives import OBJECTIVES

    print("modes:         " + ", ".join(OBJECTIVES.names()))
    print("datasets:      " + ", ".join(DATASETS.names()))
    print("architectures: " + ", ".join(ARCHS.names()) + ", or module:factory")
    from protect.recipes import RecipeError, list_recipes

    try:
        print("recipes:       " + ", ".join(list_recipes("teachers")) + " (protect train --config NAME)")
    except RecipeError as exc:
        print(f"recipes:       none ({exc})")
    return 0


def with_recipe(args: argparse.Namespace, argv: list[str] | None) -> argparse.Namespace:
    """`train --config RECIPE`: the command line parsed again with the recipe's values as the defaults, so that
    explicit flags override them."""
    if args.command != "train" or not args.config:
        return args
    from protect.recipes import load_teacher_recipe

    return build_parser(load_teacher_recipe(args.config).defaults).parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from protect.card import ModelDirError
    from protect.data import DatasetNotFoundError
    from protect.export import ExportError
    from protect.runs import RunDirError
    from protect.trainer import CheckpointError, NonFiniteLossError

    args = build_parser().parse_args(argv)
    handlers = {"train": cmd_train, "eval": cmd_eval, "export": cmd_export, "list": cmd_list}
    try:
        args = with_recipe(args, argv)
        return handlers[args.command](args)
    except (UnknownNameError, UsageError, DatasetNotFoundError) as exc:
        print(f"protect {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ModelDirError, RunDirError, CheckpointError, ExportError, NonFiniteLossError) as exc:
        print(f"protect {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"protect {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`protect eval M --json | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
