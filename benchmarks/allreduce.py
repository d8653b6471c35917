"""Gradient allreduce cost of none / fp16 / kept / kept-fp16, side by side, in one Horovod job.

    horovodrun -np 2 python benchmarks/allreduce.py [--reps 15]

For MLPs of about 0.1M, 1M and 10M parameters and masks of sparsity 0, 0.5, 0.9, 0.99 (random,
seeded: only the number of kept entries matters for communication), the four schemes are measured
on the same gradients, interleaved repetition by repetition so that the machine's noise hits all
of them alike; medians, ranks aligned by a barrier before each timing; rank 0 prints.

  wire ms   the collective alone: one grouped allreduce of all gradient tensors (none, fp16: what
            Horovod's DistributedOptimizer fuses) or one allreduce of the packed kept entries
  sync ms   what a training step pays after backward: the collective plus masking the averaged
            gradients (none, fp16) or plus the gather and scatter of the kept entries (kept*)
  step ms   a whole training step with hvd_sparse's GradientSync for the scheme: forward, backward
            (with the allreduce overlapped for none/fp16), synchronize, SGD step, re-zero
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import horovod.torch as hvd
import torch
import torch.nn.functional as F

from common import medians

from hvd_sparse import dist, gradsync
from hvd_sparse.cli import say
from hvd_sparse.mask import Mask
from hvd_sparse.models import MLP

SIZES = {"0.1M": (96,), "1M": (1000,), "10M": (3072, 2048)}
SPARSITIES = (0.0, 0.5, 0.9, 0.99)
SCHEMES = ("none", "fp16", "kept", "kept-fp16")
BATCH, INPUT = 64, (1, 32, 32)


class Case:
    """One scheme on its own copy of the model, with timers for wire, sync and step."""

    def __init__(self, scheme: str, hidden: tuple[int, ...], sparsity: float, data: tuple[torch.Tensor, torch.Tensor]):
        self.scheme, self.x, self.y = scheme, *data
        self.model = MLP(INPUT, 10, hidden)
        dist.broadcast_parameters(self.model)
        g = torch.Generator().manual_seed(0)
        self.mask = Mask({n: torch.rand(p.shape, generator=g) >= sparsity for n, p in self.model.named_parameters()})
        self.mask.apply_to_params(self.model)
        self.sync = gradsync.gradient_sync(scheme, [(torch.optim.SGD(self.model.parameters(), lr=1e-4), self.model, self.mask)])
        self.times: dict[str, list[float]] = {"wire": [], "sync": [], "step": []}

    def backward(self) -> None:
        self.sync.zero_grad()
        F.cross_entropy(self.model(self.x), self.y).backward()
        if not self.scheme.startswith("kept"):
            self.sync.optimizer.synchronize()  # the hooks' own allreduces, done before ours are timed

    def wire(self) -> None:
        if self.scheme.startswith("kept"):
            kept = self.sync.flat.index_select(0, self.sync.index)
            payload = [kept.half() if self.scheme == "kept-fp16" else kept]
        else:
            grads = [p.grad for p in self.model.parameters()]
            payload = [g.half() for g in grads] if self.scheme == "fp16" else grads
        hvd.barrier()
        start = time.perf_counter()
        hvd.grouped_allreduce(payload, op=hvd.Average, name=f"bench.{self.scheme}")
        self.times["wire"].append(time.perf_counter() - start)

    def synchronize(self) -> None:
        if self.scheme.startswith("kept"):
            run = self.sync.synchronize
        else:
            def run() -> None:
                grads = [p.grad for p in self.model.parameters()]
                wire = [g.half() for g in grads] if self.scheme == "fp16" else grads
                for g, out in zip(grads, hvd.grouped_allreduce(wire, op=hvd.Average, name=f"bench.sync.{self.scheme}")):
                    g.copy_(out)
                self.mask.apply_to_grads(self.model)
        self._time("sync", run)

    def step(self) -> None:
        def run() -> None:
            self.sync.zero_grad()
            F.cross_entropy(self.model(self.x), self.y).backward()
            self.sync.synchronize()
            self.sync.step()
            self.mask.apply_to_params(self.model)
        self._time("step", run)

    def _time(self, key: str, fn: Callable[[], None]) -> None:
        hvd.barrier()
        start = time.perf_counter()
        fn()
        self.times[key].append(time.perf_counter() - start)

    def median_ms(self, key: str) -> float:
        return medians(self.times)[key] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    dist.init()
    root = hvd.rank() == 0
    for _ in range(50):  # warm up the controller and the transport
        hvd.allreduce(torch.ones(1024), name="warmup")
    g = torch.Generator().manual_seed(hvd.rank())
    per_rank = BATCH // hvd.size()
    data = (torch.randn(per_rank, *INPUT, generator=g), torch.randint(0, 10, (per_rank,), generator=g))
    if root:
        say(f"world size {hvd.size()}, global batch {BATCH}, torch threads per rank {torch.get_num_threads()}, "
            f"{args.reps} interleaved repetitions, medians")
        say(f"{'params':>9} {'sparsity':>8} {'scheme':>9} {'bytes/step':>12} {'wire ms':>8} {'x none':>6} "
            f"{'sync ms':>8} {'x none':>6} {'step ms':>8} {'x none':>6}")
    for hidden in SIZES.values():
        for sparsity in SPARSITIES:
            cases = [Case(scheme, hidden, sparsity, data) for scheme in SCHEMES]
            for case in cases:
                for _ in range(2):
                    case.step()  # warm up; then reset
                case.times = {k: [] for k in case.times}
            for _ in range(args.reps):
                for case in cases:
                    case.step()
                    case.backward()
                    case.wire()
                    case.synchronize()
            base = cases[0]
            for case in cases:
                if root:
                    params = sum(p.numel() for p in case.model.parameters())
                    ratios = [case.median_ms(k) / base.median_ms(k) for k in ("wire", "sync", "step")]
                    say(f"{params:>9,} {sparsity:>8} {case.scheme:>9} {case.sync.bytes_per_step:>12,} "
                        f"{case.median_ms('wire'):>8.2f} {ratios[0]:>6.2f} {case.median_ms('sync'):>8.2f} "
                        f"{ratios[1]:>6.2f} {case.median_ms('step'):>8.1f} {ratios[2]:>6.2f}")


if __name__ == "__main__":
    main()
