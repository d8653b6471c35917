"""Batches per second: hvd_sparse's in-memory batching vs a torch DataLoader over the same tensors.

    python benchmarks/data_path.py [--batch-size 64] [--batches 3000] [--repeats 3]

MNIST shapes (60,000 x 1 x 28 x 28 float32 and their labels, in memory), batch 64, one process.
hvd_sparse: GlobalBatches(...).shard(step, 0, 1) then one index_select of the images and labels,
exactly what the training loop does per step. DataLoader: TensorDataset, shuffle=True, the default
collate (num_workers=0: with the data in memory, worker processes only add pickling; 2 is shown too).
Median of interleaved repeats; the goal is >= 3x.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader, TensorDataset
from common import interleaved, medians

from hvd_sparse.data import GlobalBatches


def in_memory(x: torch.Tensor, y: torch.Tensor, batch: int, count: int) -> float:
    batches = GlobalBatches(len(y), batch, seed=0)
    t0 = time.perf_counter()
    for step in range(count):
        idx = batches.shard(step, 0, 1)
        xb, yb = x[idx], y[idx]
    assert xb.shape[0] == batch and yb.shape[0] == batch
    return count / (time.perf_counter() - t0)


def data_loader(x: torch.Tensor, y: torch.Tensor, batch: int, count: int, workers: int) -> float:
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    done = 0
    t0 = time.perf_counter()
    while done < count:
        for xb, yb in loader:
            done += 1
            if done == count:
                break
    assert xb.shape[0] == batch
    return count / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60000, 1, 28, 28, generator=g), torch.randint(0, 10, (60000,), generator=g)
    med = medians(interleaved({
        "hvd_sparse in-memory": lambda: in_memory(x, y, args.batch_size, args.batches),
        "DataLoader, 0 workers": lambda: data_loader(x, y, args.batch_size, args.batches, 0),
        "DataLoader, 2 workers": lambda: data_loader(x, y, args.batch_size, args.batches // 3, 2),
    }, args.repeats))
    ours = med["hvd_sparse in-memory"]
    print(f"batches/s, batch {args.batch_size}, MNIST shapes in memory, median of {args.repeats}")
    print(f"{'path':<24} {'batches/s':>10} {'us/batch':>9} {'hvd_sparse speed-up':>20}")
    for name, rate in med.items():
        print(f"{name:<24} {rate:10.0f} {1e6 / rate:9.1f} {ours / rate:20.1f}x")


if __name__ == "__main__":
    main()
