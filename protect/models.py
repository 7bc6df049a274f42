"""Architectures by name (timm-style `create_model`), sized for 8×8 to 32×32 inputs.

Every model has `forward(x) -> logits` and `forward_features(x) -> (logits, {"mid", "penultimate"})`
(the audit's feature-based attacks read them) and `feature_dims`. A user model is `module:factory`.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from protect.registry import Registry

ARCHS: Registry[Callable[..., nn.Module]] = Registry("architecture")


def _conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class FeatureClassifier(nn.Module):
    """stem → stages → global pool → linear. 'mid' is the output of the middle stage."""

    def __init__(self, stages: Sequence[nn.Module], widths: Sequence[int], num_classes: int, mid_stage: int):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.mid_stage = mid_stage
        self.head = nn.Linear(widths[-1], num_classes)
        self.feature_dims = {"mid": widths[mid_stage], "penultimate": widths[-1]}

    def forward_features(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        mid = x
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i == self.mid_stage:
                mid = x
        pen = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.head(pen), {"mid": mid, "penultimate": pen}

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)[0]


def _plain_cnn(stage_widths: Sequence[Sequence[int]], in_channels: int, num_classes: int,
               image_size: int) -> FeatureClassifier:
    """Stages of 3×3 conv-BN-ReLU; 2×2 max-pool after each stage but the last, never below 2×2."""
    stages, c, size = [], in_channels, image_size
    for i, widths in enumerate(stage_widths):
        layers = []
        for w in widths:
            layers.append(_conv_bn(c, w))
            c = w
        if i < len(stage_widths) - 1 and size >= 4:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        stages.append(nn.Sequential(*layers))
    return FeatureClassifier(stages, [ws[-1] for ws in stage_widths], num_classes, mid_stage=len(stage_widths) - 2)


@ARCHS.register("cnn-tiny")
def cnn_tiny(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """~25k parameters: 16-32-64 channels, one conv per stage."""
    return _plain_cnn([[16], [32], [64]], in_channels, num_classes, image_size)


@ARCHS.register("cnn-small")
def cnn_small(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """~95k parameters: 32-64-128 channels, one conv per stage (the default student)."""
    return _plain_cnn([[32], [64], [128]], in_channels, num_classes, image_size)


@ARCHS.register("cnn-medium")
def cnn_medium(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """~0.6M parameters, ~5× cnn-small's compute: the widest convs run at the lowest resolution (default teacher)."""
    return _plain_cnn([[32], [64, 64], [192, 256]], in_channels, num_classes, image_size)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _resnet(widths: Sequence[int], blocks: Sequence[int], in_channels: int, num_classes: int,
            image_size: int) -> FeatureClassifier:
    stages: list[nn.Module] = [_conv_bn(in_channels, widths[0])]
    c, size = widths[0], image_size
    for i, (w, n) in enumerate(zip(widths, blocks)):
        stride = 2 if i > 0 and size >= 4 else 1
        size //= stride
        layers = [BasicBlock(c, w, stride)] + [BasicBlock(w, w, 1) for _ in range(n - 1)]
        stages.append(nn.Sequential(*layers))
        c = w
    return FeatureClassifier(stages, [widths[0], *widths], num_classes, mid_stage=len(stages) - 2)


@ARCHS.register("resnet8")
def resnet8(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """CIFAR-style ResNet-8 (~78k parameters): 16-32-64 channels, one block per stage."""
    return _resnet((16, 32, 64), (1, 1, 1), in_channels, num_classes, image_size)


@ARCHS.register("resnet20")
def resnet20(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """CIFAR-style ResNet-20 (~0.27M parameters)."""
    return _resnet((16, 32, 64), (3, 3, 3), in_channels, num_classes, image_size)


@ARCHS.register("resnet18")
def resnet18(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """ResNet-18 layout for small images (~11M parameters): 3×3 stem, no initial pooling."""
    return _resnet((64, 128, 256, 512), (2, 2, 2, 2), in_channels, num_classes, image_size)


class _HookedFeatures(nn.Module):
    """Gives a user model `forward_features`: penultimate = the input of its last nn.Linear."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("user model has no nn.Linear head; give it a forward_features method")
        self._head = linears[-1]
        self.feature_dims = {"penultimate": self._head.in_features}

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def forward_features(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        seen: dict[str, Tensor] = {}
        handle = self._head.register_forward_hook(lambda m, inp, out: seen.__setitem__("penultimate", inp[0]))
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        return logits, seen


def create_model(name: str, num_classes: int, in_channels: int, image_size: int, **kwargs) -> nn.Module:
    """Build an architecture by registry name, or a user model given as `module:factory`."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot load user model {name!r}: {exc}") from exc
        model = factory(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)
        return model if hasattr(model, "forward_features") else _HookedFeatures(model)
    return ARCHS.get(name)(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)
