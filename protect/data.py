"""Datasets by name (docs/design.md §7), held in memory as raw [0, 1] pixels, and loaders that yield dict batches.

Every dataset gives raw pixels (N, C, H, W) float32 in [0, 1]; normalisation (per-channel mean/std of
the training split) is applied by the loaders and recorded in the model card, so served clients send
raw pixels. No code here touches the network unless the user passes `download=True`.
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from protect.registry import Registry

DATASETS: Registry = Registry("dataset")

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


class DatasetNotFoundError(FileNotFoundError):
    """Dataset files are missing; the message says how to get them."""


@dataclass
class DatasetSplits:
    """A dataset in memory: raw pixels in [0, 1] and labels, with the training split's statistics."""

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: list[str]
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    augment: bool = False  # random crop + flip suit natural images (CIFAR), not digits or clothes

    def __post_init__(self) -> None:
        if not self.mean:
            flat = self.train_x.transpose(0, 1).reshape(self.train_x.shape[1], -1)
            self.mean = [round(float(v), 6) for v in flat.mean(1)]
            self.std = [round(max(float(v), 1e-6), 6) for v in flat.std(1)]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> list[int]:
        return list(self.train_x.shape[1:])

    def normalise(self, x: Tensor) -> Tensor:
        return normalise(x, self.mean, self.std)

    def subset_train(self, limit: int | None) -> DatasetSplits:
        """The first `limit` training rows (a fixed, seed-free subset, so runs stay comparable)."""
        if limit is None or limit >= len(self.train_y):
            return self
        return DatasetSplits(self.name, self.train_x[:limit], self.train_y[:limit], self.test_x, self.test_y,
                             self.classes, self.mean, self.std, self.augment)


def normalise(x: Tensor, mean: list[float], std: list[float]) -> Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, download: bool = False) -> DatasetSplits:
    """Load a registered dataset by name (raises UnknownNameError listing the valid names)."""
    loader = DATASETS.get(name)
    return loader(Path(data_dir) if data_dir else None, download)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise ValueError(f"{path}: only unsigned-byte IDX files are supported")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem, directory / "raw" / f"{stem}.gz",
                      directory / "raw" / stem, directory / "FashionMNIST" / "raw" / f"{stem}.gz",
                      directory / "FashionMNIST" / "raw" / stem):
        if candidate.exists():
            return candidate
    return None


@DATASETS.register("fashion-mnist")
def _fashion_mnist(data_dir: Path | None, download: bool) -> DatasetSplits:
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    directories = [d for d in (data_dir, DEBIAN_FASHION_MNIST) if d is not None]
    for directory in directories:
        paths = [_find_idx(directory, s) for s in stems]
        if all(paths):
            break
    else:
        if download and data_dir is not None:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(data_dir), train=True, download=True)
            FashionMNIST(str(data_dir), train=False, download=True)
            return _fashion_mnist(data_dir, False)
        raise DatasetNotFoundError(
            "Fashion-MNIST IDX files not found in "
            + ", ".join(str(d) for d in directories)
            + ". Install them with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu, puts them in "
            f"{DEBIAN_FASHION_MNIST}), or pass --data-dir DIR holding train-images-idx3-ubyte(.gz) etc."
        )
    arrays = [_read_idx(p) for p in paths]  # type: ignore[arg-type]
    to_x = lambda a: torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)  # noqa: E731
    to_y = lambda a: torch.from_numpy(a.astype(np.int64))  # noqa: E731
    return DatasetSplits("fashion-mnist", to_x(arrays[0]), to_y(arrays[1]), to_x(arrays[2]), to_y(arrays[3]),
                         FASHION_MNIST_CLASSES, mean=[0.286], std=[0.353])


@DATASETS.register("digits")
def _digits(data_dir: Path | None, download: bool) -> DatasetSplits:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    # A fixed permutation, so train/test splits never depend on the run's seed.
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    n_test = 360
    return DatasetSplits("digits", x[n_test:], y[n_test:], x[:n_test], y[:n_test], [str(i) for i in range(10)])


def _cifar(name: str, folder: str, train_files: list[str], test_file: str, label_key: str,
           data_dir: Path | None, download: bool) -> DatasetSplits:
    if data_dir is None or not (data_dir / folder).exists():
        if download and data_dir is not None:
            from torchvision import datasets

            cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
            cls(str(data_dir), train=True, download=True)
            cls(str(data_dir), train=False, download=True)
        else:
            raise DatasetNotFoundError(
                f"{name}: pass --data-dir DIR containing {folder}/ (torchvision's layout: the extracted python "
                f"pickle batches), or add --download where a network exists."
            )
    root = data_dir / folder

    def read(file: str) -> tuple[np.ndarray, np.ndarray]:
        # These pickles are the dataset's own files in the user's data dir (numpy arrays and lists only).
        with open(root / file, "rb") as fh:
            entry = pickle.load(fh, encoding="latin1")  # noqa: S301
        return np.asarray(entry["data"], dtype=np.uint8), np.asarray(entry[label_key], dtype=np.int64)

    parts = [read(f) for f in train_files]
    tx, ty = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    vx, vy = read(test_file)
    to_x = lambda a: torch.from_numpy(a.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)  # noqa: E731
    if name == "cifar10":
        classes = CIFAR10_CLASSES
    else:
        with open(root / "meta", "rb") as fh:
            classes = list(pickle.load(fh, encoding="latin1")["fine_label_names"])  # noqa: S301
    return DatasetSplits(name, to_x(tx), torch.from_numpy(ty), to_x(vx), torch.from_numpy(vy), classes, augment=True)


@DATASETS.register("cifar10")
def _cifar10(data_dir: Path | None, download: bool) -> DatasetSplits:
    return _cifar("cifar10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                  "labels", data_dir, download)


@DATASETS.register("cifar100")
def _cifar100(data_dir: Path | None, download: bool) -> DatasetSplits:
    return _cifar("cifar100", "cifar-100-python", ["train"], "test", "fine_labels", data_dir, download)


@DATASETS.register("imagefolder")
def _imagefolder(data_dir: Path | None, download: bool) -> DatasetSplits:
    """DIR/train/<class>/*.png and DIR/test/<class>/*.png (images of one size; grayscale or RGB)."""
    from PIL import Image

    if data_dir is None or not (data_dir / "train").is_dir() or not (data_dir / "test").is_dir():
        raise DatasetNotFoundError("imagefolder: pass --data-dir DIR with DIR/train/<class>/* and DIR/test/<class>/*")
    classes = sorted(p.name for p in (data_dir / "train").iterdir() if p.is_dir())

    def read(split: str) -> tuple[Tensor, Tensor]:
        xs, ys = [], []
        for label, cls in enumerate(classes):
            for f in sorted((data_dir / split / cls).glob("*")):
                if f.suffix.lower() not in {".png", ".jpg", ".jpeg", ".bmp"}:
                    continue
                arr = np.asarray(Image.open(f))
                arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)[:3]
                xs.append(torch.from_numpy(arr.astype(np.float32) / 255.0))
                ys.append(label)
        if not xs:
            raise DatasetNotFoundError(f"imagefolder: no images under {data_dir / split}")
        shapes = {tuple(t.shape) for t in xs}
        if len(shapes) > 1:
            raise ValueError(f"imagefolder: images must share one size, found {sorted(shapes)[:3]}")
        return torch.stack(xs), torch.tensor(ys)

    tx, ty = read("train")
    vx, vy = read("test")
    return DatasetSplits("imagefolder", tx, ty, vx, vy, classes)


class DictDataset(Dataset):
    """Tensors indexed together; batches come out as dicts {"x", "y", "index", **extras}.

    `__getitems__` fetches a whole batch with one indexing op (DataLoader uses it when present),
    which is far faster than collating single rows.
    """

    def __init__(self, x: Tensor, y: Tensor, augment: bool = False, **extras: Tensor):
        self.tensors = {"x": x, "y": y, **extras}
        self.augment = augment
        n = len(y)
        for k, v in self.tensors.items():
            if len(v) != n:
                raise ValueError(f"DictDataset: {k!r} has {len(v)} rows, expected {n}")

    def __len__(self) -> int:
        return len(self.tensors["y"])

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self.__getitems__([i])

    def __getitems__(self, indices: list[int]) -> dict[str, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        batch = {k: v[idx] for k, v in self.tensors.items()}
        batch["index"] = idx
        if self.augment:
            batch["x"] = _flip_and_crop(batch["x"])
        return batch


def _flip_and_crop(x: Tensor, pad: int = 4) -> Tensor:
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    h, w = x.shape[-2:]
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy, dx = torch.randint(0, 2 * pad + 1, (2,)).tolist()  # one offset per batch keeps this vectorised
    return padded[..., dy:dy + h, dx:dx + w]


def _passthrough(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return batch


class TensorLoader:
    """Dict batches cut from tensors held in memory (on the training device, if it is given): one shuffled index
    per epoch and one gather per tensor per batch, no per-sample Dataset or collate work.

    Shuffling follows `generator` (re-seeded by the trainer each epoch, like a DataLoader's); `augment` applies
    the same flip-and-crop as `DictDataset`.
    """

    def __init__(self, tensors: dict[str, Tensor], batch_size: int, shuffle: bool, seed: int = 0,
                 augment: bool = False, device: torch.device | str | None = None):
        n = len(tensors["y"])
        for k, v in tensors.items():
            if len(v) != n:
                raise ValueError(f"TensorLoader: {k!r} has {len(v)} rows, expected {n}")
        self.tensors = {k: v.to(device) if device is not None else v for k, v in tensors.items()}
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.generator = torch.Generator().manual_seed(seed)
        self.sampler = None
        self._n = n

    def __len__(self) -> int:
        return (self._n + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        device = self.tensors["y"].device
        order = torch.randperm(self._n, generator=self.generator) if self.shuffle else torch.arange(self._n)
        order = order.to(device)
        for start in range(0, self._n, self.batch_size):
            idx = order[start:start + self.batch_size]
            batch = {k: v[idx] for k, v in self.tensors.items()}
            batch["index"] = idx
            if self.augment:
                batch["x"] = _flip_and_crop(batch["x"])
            yield batch


def make_loader(dataset: DictDataset, batch_size: int, shuffle: bool, seed: int = 0, workers: int = 0,
                distributed: bool = False) -> DataLoader:
    """A loader of dict batches. Shuffling is seeded; the trainer re-seeds it each epoch via `set_epoch`."""
    sampler = None
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=False)
        shuffle = False
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=workers,
                      collate_fn=_passthrough, generator=generator, persistent_workers=workers > 0)


def train_and_test_sets(splits: DatasetSplits, **train_extras: Tensor) -> tuple[DictDataset, DictDataset]:
    """Normalised dict datasets for the two splits (augmentation only on the training split)."""
    train = DictDataset(splits.normalise(splits.train_x), splits.train_y, augment=splits.augment, **train_extras)
    test = DictDataset(splits.normalise(splits.test_x), splits.test_y)
    return train, test
