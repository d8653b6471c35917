"""The training loops hvd_sparse is measured against, one process per rank (see step_overhead.py).

    horovodrun -np 2 python benchmarks/peers.py horovod STEPS BATCH       # bare Horovod example loop
    python -m torch.distributed.run --nproc_per_node 2 benchmarks/peers.py ddp-prune STEPS BATCH
    python benchmarks/peers.py compute STEPS BATCH                       # np=1 at BATCH/2, no communication

Same model (Simple-CNN), data (the bundled mnist5k digits, in memory), optimizer (Nesterov,
lr 0.01, momentum 0.9), per-rank batch BATCH/2 and torch threads per rank (cores / ranks) as
hvd_sparse's own loop. Rank 0 prints "ms_per_step <value>": the mean over the last STEPS - 20 steps
(the first 20 warm up), timed between two barriers.
"""
from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F

from hvd_sparse.config import DataConfig
from hvd_sparse.data import load_datasets
from hvd_sparse.models import build_model

WARMUP = 20


def setup(ranks_per_node: int) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(max(1, cores // ranks_per_node))
    data = load_datasets(DataConfig(dataset="mnist5k"))
    model = build_model("simple-cnn", data.input_shape, data.num_classes, seed=0)
    return data.train.x, data.train.y, model


def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)


def plain_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    """The step every peer takes: zero, forward, backward, optimizer step (its own model and optimizer)."""

    def step(idx: torch.Tensor) -> None:
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()

    return step


def loop(step_fn, steps: int, local: int, n: int, barrier, rank: int) -> None:
    gen = torch.Generator().manual_seed(rank)
    for i in range(steps):
        if i == WARMUP:
            barrier()
            t0 = time.perf_counter()
        step_fn(torch.randint(0, n, (local,), generator=gen))
    barrier()
    if rank == 0:
        print(f"ms_per_step {(time.perf_counter() - t0) / (steps - WARMUP) * 1000:.3f}", flush=True)


def horovod(steps: int, batch: int) -> None:
    import horovod.torch as hvd

    hvd.init()
    x, y, model = setup(hvd.local_size())
    opt = hvd.DistributedOptimizer(optimizer(model), named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    loop(plain_step(model, opt, x, y), steps, batch // hvd.size(), len(y), hvd.barrier, hvd.rank())


def ddp_prune(steps: int, batch: int) -> None:
    import torch.distributed as torch_dist
    from torch.nn.utils import prune

    torch_dist.init_process_group("gloo")
    world, rank = torch_dist.get_world_size(), torch_dist.get_rank()
    x, y, model = setup(int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    prunable = [(m, "weight") for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    prune.global_unstructured(prunable, pruning_method=prune.L1Unstructured, amount=0.9)  # masks, re-applied every forward
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    loop(plain_step(ddp, optimizer(ddp), x, y), steps, batch // world, len(y), torch_dist.barrier, rank)
    torch_dist.destroy_process_group()


def compute(steps: int, batch: int) -> None:
    x, y, model = setup(2)  # the share of the cores one of two ranks gets
    loop(plain_step(model, optimizer(model), x, y), steps, batch // 2, len(y), lambda: None, 0)


if __name__ == "__main__":
    mode, n_steps, global_batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    {"horovod": horovod, "ddp-prune": ddp_prune, "compute": compute}[mode](n_steps, global_batch)
