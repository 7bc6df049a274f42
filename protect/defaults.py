"""What both the CLI and the training assembly need: per-dataset defaults, the evaluation temperatures and the
usage error.

A module of its own so that protect/cli.py and protect/teacher.py import it instead of each other.
"""
from __future__ import annotations

# Fashion-MNIST's default is what experiments.protection audits (bench/results/protection-fashion-mnist.md), so
# `protect train --mode cmim` trains the recipe audited there (recipes/teachers/cmim.toml). 16 epochs, not 12: at
# 12 the CMIM teacher still under-fits (train accuracy 93.1% against CE's 94.4%) and pays for it in test accuracy
# (docs/results.md, "Why 16 epochs").
DATASET_DEFAULTS: dict[str, dict] = {
    "fashion-mnist": {"arch": "cnn-small", "epochs": 16, "lr": 0.05, "batch_size": 128},
    "digits": {"arch": "cnn-small", "epochs": 20, "lr": 0.05, "batch_size": 64},
    "cifar10": {"arch": "resnet20", "epochs": 100, "lr": 0.1, "batch_size": 128},
    "cifar100": {"arch": "resnet20", "epochs": 100, "lr": 0.1, "batch_size": 128},
    "imagefolder": {"arch": "cnn-small", "epochs": 30, "lr": 0.05, "batch_size": 64},
}

# The temperatures at which `protect eval`, training's final report and the audit's report measure CMI.
EVAL_TEMPERATURES = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
# The shorter spectrum a model card (model.json) records at export.
CARD_TEMPERATURES = (1.0, 4.0, 16.0)


class UsageError(ValueError):
    """Bad input from the user (flags, paths, combinations): printed as is, exit status 2. `protect` and `audit`
    both raise this one class."""
