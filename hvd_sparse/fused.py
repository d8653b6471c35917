"""Several trials of one model trained as one: the forward passes of T same-shaped models in one call.

Each trial keeps its own ``nn.Module`` (its parameters, optimizer, mask, checkpoint: exactly those of
a trial trained alone). A fused step stacks the T models' parameters, name by name, and maps the
model's forward over them with ``torch.func.vmap``: a convolution of T models becomes one grouped
convolution, a linear layer one batched matmul, whatever the model (all registry models are fused
by the same code). The stacking is differentiable, so one backward of the summed losses puts each
trial's gradient into its own parameters' ``.grad``; a trial's gradient depends on its own
parameters and data only (another trial's NaN does not reach it).

vmap rather than hand-fused layers (grouped convolutions and ``baddbmm`` written per model): side
by side on Simple-CNN (``benchmarks/fuse_ops.py``, BENCHMARKS.md) the two cost the same at the small
batches where fusing pays, and vmap needs no second forward for each of the five models.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap

from hvd_sparse.models import Loss, cross_entropy, cross_entropy_sum

# On a CPU the fused forward and backward pass pays only at the smallest batches: from 16 examples a
# model on, the grouped convolutions over T models' activations (which no longer fit the caches)
# cost 1.6x the same models run one by one (Simple-CNN, 16 models, one thread: BENCHMARKS.md,
# benchmarks/fuse_ops.py). Above this batch (per rank) fused trials on a CPU run their passes model
# by model and keep the rest: one allreduce, one loop. GPUs always fuse.
CPU_MAX_BATCH = 8


def pays(device: torch.device, batch_per_rank: int) -> bool:
    """Whether trials of this batch (per rank) on this device run their passes fused (vmap)."""
    return device.type != "cpu" or batch_per_rank <= CPU_MAX_BATCH


def stacked(models: Sequence[nn.Module]) -> dict[str, torch.Tensor]:
    """Name -> the models' parameters stacked along a new first dimension (differentiable).

    One model is stacked with a detached copy of itself: vmap runs a single model's convolutions as
    plain ones, whose kernels sum in another order than the grouped convolutions of two or more, so
    a trial left alone in its array would drift from the bits it had beside others (a neighbour's
    end would change its numbers). The copy's gradient goes nowhere.
    """
    named = [dict(m.named_parameters()) for m in models]
    if len(named) == 1:
        named.append({name: p.detach() for name, p in named[0].items()})
    return {name: torch.stack([params[name] for params in named]) for name in named[0]}


def losses(models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, loss_fn: Loss = cross_entropy) -> torch.Tensor:
    """[T] mean losses: model t on its own batch ``x[t]``, ``y[t]``."""
    template, t = models[0], len(models)

    def loss(params: dict[str, torch.Tensor], xt: torch.Tensor, yt: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(template, params, (xt,)), yt)

    if t == 1:  # beside its copy (``stacked``)
        x, y = x.expand(2, *x.shape[1:]), y.expand(2, *y.shape[1:])
    return vmap(loss)(stacked(models), x, y)[:t]


@torch.no_grad()
def evaluate(models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, batch_size: int,
             loss_sum: Loss = cross_entropy_sum) -> torch.Tensor:
    """[T, 3]: each model's [errors, examples, loss sum] on the same examples ``x``, ``y``."""
    template = models[0]
    params = stacked(models)
    logits_of = vmap(lambda p, xb: functional_call(template, p, (xb,)), in_dims=(0, None))
    loss_of = vmap(loss_sum, in_dims=(0, None))
    totals = torch.zeros(len(models), 3, dtype=torch.float64, device=x.device)
    for start in range(0, len(y), batch_size):
        logits = logits_of(params, x[start : start + batch_size])[: len(models)].float()
        target = y[start : start + batch_size]
        totals[:, 0] += (logits.argmax(dim=2) != target).sum(dim=1)
        totals[:, 2] += loss_of(logits, target).double()
    totals[:, 1] = len(y)
    return totals
