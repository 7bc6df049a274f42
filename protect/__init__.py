"""protect: train undistillable (CMIM) or distillation-friendly (MCMI) classifiers, measure CMI, export ONNX.

The public names load lazily, so `import protect.card` (used by the server) does not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["CMIMLoss", "MCMILoss", "conditional_mutual_information", "cmi_spectrum", "separation", "normalised_cmi"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("protect.cmi"), name)
    raise AttributeError(f"module 'protect' has no attribute {name!r}")
