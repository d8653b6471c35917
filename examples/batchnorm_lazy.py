"""An example plug-in, written only against hvd_sparse's public API: a network with BatchNorm, and a
dataset read lazily from .npy files (each rank reads only the examples of its own shard).

    python examples/batchnorm_lazy.py /tmp/shards            # writes the data files (a few seconds)
    horovodrun -np 2 python -m hvd_sparse.train --plugin examples/batchnorm_lazy.py \
        --model bn-cnn --dataset npy-shards --data-dir /tmp/shards --sparsity 0.5 --batch-size 64 \
        --max-steps 200 --goal-error 0.1 --out runs/example
    horovodrun -np 2 python -m hvd_sparse.study examples/batchnorm_lazy.yaml --out runs/example-study

At np=2 the BatchNorm layers normalize by the statistics of the whole global batch (the toolkit
synchronizes them), so the run is the same optimization as at np=1.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
from torch import nn

import hvd_sparse
from hvd_sparse import LazyData

PER_FILE = 250  # examples per .npy file
SIZES = {"train": 3000, "test": 500}
SHAPE = (1, 16, 16)


@hvd_sparse.register_model("bn-cnn")
def bn_cnn(input_shape, num_classes):
    c = input_shape[0]
    return nn.Sequential(
        nn.Conv2d(c, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(32, num_classes))


class NpyShards:
    """A map-style dataset over ``{split}-NNN-x.npy`` / ``-y.npy`` files, opened as memory maps: an
    example is read from disk when it is asked for, never the whole split."""

    def __init__(self, folder: Path, split: str):
        self.files = sorted(folder.glob(f"{split}-*-x.npy"))
        if not self.files:
            raise FileNotFoundError(f"{folder}: no {split}-*-x.npy files (write them: python {__file__} {folder})")
        self.x = [np.load(f, mmap_mode="r") for f in self.files]
        self.y = [np.load(str(f).replace("-x.npy", "-y.npy")) for f in self.files]
        self.n = sum(len(y) for y in self.y)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        f, j = divmod(int(i), PER_FILE)
        return np.array(self.x[f][j], dtype=np.float32), int(self.y[f][j])


@hvd_sparse.register_dataset("npy-shards")
def npy_shards(data_dir):
    if data_dir is None:
        raise ValueError(f"npy-shards needs --data-dir (write the files first: python {__file__} DIR)")
    folder = Path(data_dir)
    digest = hashlib.sha256()
    for f in sorted(folder.glob("*.npy")):  # small files: their hash is the data's fingerprint
        digest.update(f.name.encode() + f.read_bytes())
    return LazyData(NpyShards(folder, "train"), NpyShards(folder, "test"), num_classes=10, workers=2,
                    fingerprint=digest.hexdigest())


def write(folder: Path, seed: int = 0) -> None:
    """Ten classes, each a smooth random prototype plus noise, already standardized (float32)."""
    rng = np.random.default_rng(seed)
    prototypes = np.kron(rng.normal(0, 1, (10, 1, 4, 4)), np.ones((4, 4)))
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in SIZES.items():
        y = rng.integers(0, 10, n)
        x = (prototypes[y] + rng.normal(0, 1.5, (n, *SHAPE))).astype(np.float32) / 1.8
        for k, start in enumerate(range(0, n, PER_FILE)):
            np.save(folder / f"{split}-{k:03d}-x.npy", x[start:start + PER_FILE])
            np.save(folder / f"{split}-{k:03d}-y.npy", y[start:start + PER_FILE].astype(np.int64))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: python {sys.argv[0]} DATA_DIR")
    write(Path(sys.argv[1]))
    print(f"wrote {sum(SIZES.values())} examples to {sys.argv[1]}")
