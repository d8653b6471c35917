"""Gradient allreduce cost of none / fp16 / mask / mask-fp16, side by side, in one Horovod job.

    horovodrun -np 2 python benchmarks/allreduce.py [--reps 20]

For MLPs of about 0.1M, 1M and 10M parameters and masks of sparsity 0, 0.5, 0.9, 0.99 (random,
seeded: only the count of kept entries matters for communication), every scheme is timed on the
same gradients:
  allreduce ms  the communication step alone after a finished backward, including the masking of
                the averaged gradient and, for mask*, the gather and scatter of the kept entries
                (none/fp16: one grouped allreduce of all gradient tensors, as Horovod's
                DistributedOptimizer fuses them; mask*: hvd_sparse's PackedMaskSync.synchronize)
  step ms       a whole training step with hvd_sparse's GradientSync for that scheme (forward,
                backward with overlapped allreduce for none/fp16, synchronize, SGD step, re-zero)
Medians over --reps repetitions, ranks aligned by a barrier before each; rank 0 prints.
"""
from __future__ import annotations

import argparse
import statistics
import time

import horovod.torch as hvd
import torch
import torch.nn.functional as F

from hvd_sparse import dist
from hvd_sparse.mask import Mask
from hvd_sparse.models import MLP

SIZES = {"0.1M": (96,), "1M": (1000,), "10M": (3072, 2048)}
SPARSITIES = (0.0, 0.5, 0.9, 0.99)
SCHEMES = ("none", "fp16", "mask", "mask-fp16")
BATCH, INPUT = 64, (1, 32, 32)


def random_mask(model: torch.nn.Module, sparsity: float, seed: int) -> Mask:
    g = torch.Generator().manual_seed(seed)
    return Mask({n: torch.rand(p.shape, generator=g) >= sparsity for n, p in model.named_parameters()})


def dense_allreduce(model: torch.nn.Module, mask: Mask, fp16: bool) -> None:
    grads = [p.grad for p in model.parameters()]
    wire = [g.half() for g in grads] if fp16 else grads
    out = hvd.grouped_allreduce(wire, op=hvd.Average, name="bench.dense")
    for g, o in zip(grads, out):
        g.copy_(o)
    mask.apply_to_grads(model)


def timed(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        hvd.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    dist.init()
    root = hvd.rank() == 0
    if root:
        print(f"world size {hvd.size()}, batch {BATCH} per step, torch threads {torch.get_num_threads()}")
        print(f"{'params':>9} {'sparsity':>8} {'scheme':>9} {'bytes/step':>12} {'allreduce ms':>12} {'vs none':>8} {'step ms':>8}")
    g = torch.Generator().manual_seed(hvd.rank())
    x, y = torch.randn(BATCH // hvd.size(), *INPUT, generator=g), torch.randint(0, 10, (BATCH // hvd.size(),), generator=g)
    for size_name, hidden in SIZES.items():
        for sparsity in SPARSITIES:
            base = None
            for scheme in SCHEMES:
                model = MLP(INPUT, 10, hidden)
                dist.broadcast_parameters(model)
                mask = random_mask(model, sparsity, seed=0)
                mask.apply_to_params(model)
                sync = dist.gradient_sync(scheme, torch.optim.SGD(model.parameters(), lr=1e-3), model, mask)

                def backward() -> None:
                    sync.zero_grad()
                    F.cross_entropy(model(x), y).backward()

                def step() -> None:
                    backward()
                    sync.synchronize()
                    sync.step()
                    mask.apply_to_params(model)

                for _ in range(3):
                    step()  # warm up (and let Horovod settle its fusion)
                step_ms = timed(step, args.reps)
                backward()
                if scheme.startswith("mask"):
                    comm = sync.synchronize
                else:
                    sync.optimizer.synchronize()  # let the hooks' allreduces finish before timing ours
                    comm = lambda: dense_allreduce(model, mask, fp16=scheme == "fp16")  # noqa: E731
                comm_ms = timed(comm, args.reps)
                base = comm_ms if scheme == "none" else base
                if root:
                    params = sum(p.numel() for p in model.parameters())
                    print(f"{params:>9,} {sparsity:>8} {scheme:>9} {sync.bytes_per_step:>12,} {comm_ms:>12.2f} "
                          f"{comm_ms / base:>8.2f} {step_ms:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
