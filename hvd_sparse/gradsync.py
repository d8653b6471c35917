"""Gradient synchronization: how one step's gradients are averaged over the ranks and masked.

``gradient_sync(kind, parts)`` picks the scheme for ``--grad-compression`` and the job:

- ``MaskOnly``: one rank, nothing to average;
- ``TensorwiseAverage``: Horovod's DistributedOptimizer, one allreduce per tensor overlapped with
  backward (one trial, dense, on Horovod);
- ``FlatAverage``: one allreduce of every trial's gradients as one flat vector, either every entry
  (dense: the torch.distributed engine, fused trials, channels-last parameters) or only the kept
  entries (``kept_only``: ``--grad-compression kept``, no indices on the wire).

Every scheme leaves in each ``p.grad`` the masked average over ranks, pruned entries exactly 0.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from hvd_sparse import dist
from hvd_sparse.mask import Mask, split_flat


class GradientSync:
    """How the training loop averages and masks the gradients of its trials (one, or several fused:
    ``parts``, one (optimizer, model, mask) each); ``bytes_per_trial[i]`` is trial i's share of the
    payload of one step's gradient allreduce(s), the same on every rank."""

    optimizers: list[torch.optim.Optimizer]
    bytes_per_trial: list[int]

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The first trial's optimizer (the only one, unless trials are fused)."""
        return self.optimizers[0]

    @property
    def bytes_per_step(self) -> int:
        return sum(self.bytes_per_trial)

    def zero_grad(self) -> None:
        raise NotImplementedError

    def synchronize(self) -> None:
        """After backward: every p.grad holds the masked average over ranks."""
        raise NotImplementedError

    def step(self, i: int = 0) -> None:
        """Trial i's optimizer step."""
        self.optimizers[i].step()


Part = tuple[torch.optim.Optimizer, nn.Module, Mask]  # one trial's optimizer, model and mask


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def payload_bytes(kind: str, model: nn.Module, mask: Mask) -> int:
    """A trial's bytes in one step's gradient allreduce under gradient compression ``kind``: every
    entry (none, fp16), or the kept ones (kept, kept-fp16); 2 bytes an entry with fp16, else 4."""
    params = _trainable(model)
    entries = (sum(p.numel() if m is None else int(m.sum()) for m, p in zip(mask.by_parameter(model), params))
               if kind.startswith("kept") else sum(p.numel() for p in params))
    return entries * (2 if kind.endswith("fp16") else 4)


class TensorwiseAverage(GradientSync):
    """Horovod's DistributedOptimizer (one trial): one allreduce per tensor, fused by Horovod,
    overlapped with backward; the averaged gradients are masked before the step."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, mask: Mask, fp16: bool):
        self.model, self.mask = model, mask
        self.optimizers = [dist.distributed_optimizer(optimizer, model, fp16)]
        self.bytes_per_trial = [payload_bytes("fp16" if fp16 else "none", model, mask)]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def synchronize(self) -> None:
        with dist.waiting("grad.dense"):
            self.optimizer.synchronize()
        self.mask.apply_to_grads(self.model)

    def step(self, i: int = 0) -> None:
        with self.optimizer.skip_synchronize():
            self.optimizer.step()


class FlatAverage(GradientSync):
    """One allreduce of all gradients of all trials as one flat vector.

    ``kept_only``: send only the kept (unpruned) entries: every rank holds the same masks, so the kept gradient
    values of all parameters of all trials are gathered into one vector, in the same order
    everywhere, and averaged in a single allreduce with no indices at all.

    The gradients live as views into one flat buffer, so gathering is one index_select, scattering
    back one index_copy into the zeroed buffer (which leaves pruned entries exactly 0). One large
    message per step, rather than a Compressor's one per tensor, also saves Horovod's per-tensor
    negotiation. A trial's entries are its own slice of the vector: a non-finite value of one trial
    stays in its slice (the allreduce adds entry by entry).

    Otherwise every entry is sent, pruned ones too, and masked after the average: the dense
    allreduce of the torch.distributed engine and of fused trials (the same values at every kept entry
    as Horovod's per-tensor one, and the same bytes on the wire).
    """

    def __init__(self, parts: Sequence[Part], fp16: bool, kept_only: bool):
        self.optimizers, self.fp16 = [optimizer for optimizer, _, _ in parts], fp16
        self.params = [p for _, model, _ in parts for p in _trainable(model)]
        device = self.params[0].device
        self.flat = torch.zeros(sum(p.numel() for p in self.params), device=device)
        self.views = split_flat(self.flat, [p.shape for p in self.params])
        keeps = [torch.cat([torch.ones(p.numel(), dtype=torch.bool, device=device) if m is None or not kept_only
                            else m.reshape(-1).to(device) for m, p in zip(mask.by_parameter(model), _trainable(model))])
                 for _, model, mask in parts]
        self.index = torch.cat(keeps).nonzero().squeeze(1)
        self.masked_after = [] if kept_only else [(mask, model) for _, model, mask in parts]
        self.name = "grad.kept" if kept_only else "grad.dense"
        kind = ("kept-fp16" if fp16 else "kept") if kept_only else ("fp16" if fp16 else "none")
        self.bytes_per_trial = [payload_bytes(kind, model, mask) for _, model, mask in parts]

    def zero_grad(self) -> None:
        for p, view in zip(self.params, self.views):
            if p.grad is not view:  # someone replaced it (e.g. Horovod's optimizer-state broadcast)
                p.grad = view
        self.flat.zero_()

    def synchronize(self) -> None:
        kept = self.flat.index_select(0, self.index)
        if dist.size() > 1:
            wire = kept.half() if self.fp16 else kept
            kept = dist.allreduce_mean(wire, self.name).to(self.flat.dtype)
        self.flat.zero_()
        self.flat.index_copy_(0, self.index, kept)
        for mask, model in self.masked_after:
            mask.apply_to_grads(model)


class MaskOnly(GradientSync):
    """One rank: nothing to average, so the gradients are only masked. (Horovod's optimizer at size 1
    registers no hooks and, in synchronize, sends every tensor through its background thread one
    after the other: 12 allreduces of one rank per Simple-CNN step for nothing.)"""

    def __init__(self, parts: Sequence[Part], bytes_per_trial: list[int]):
        self.parts, self.optimizers, self.bytes_per_trial = parts, [o for o, _, _ in parts], bytes_per_trial

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad()

    def synchronize(self) -> None:
        for _, model, mask in self.parts:
            mask.apply_to_grads(model)


def _dense(parts: Sequence[Part], fp16: bool, fused: bool) -> GradientSync:
    if dist.size() == 1:  # no wire, so no fp16 rounding either (as FlatAverage at size 1)
        return MaskOnly(parts, [payload_bytes("fp16" if fp16 else "none", model, mask) for _, model, mask in parts])
    # fused: never Horovod's optimizer, whose wrapper starts with no state; channels-last parameters: their
    # gradients too, which Horovod's optimizer refuses ("Tensor is required to be contiguous")
    if dist.backend() == "torch" or fused or any(not p.is_contiguous() for _, model, _ in parts for p in model.parameters()):
        return FlatAverage(parts, fp16, kept_only=False)
    return TensorwiseAverage(*parts[0], fp16)


def gradient_sync(kind: str, parts: Sequence[Part], fused: bool = False) -> GradientSync:
    """The gradient averaging of one trial, or of the trials fused in an engine (``fused``, one or
    more: one allreduce for all of them; their optimizers stay as built). ``kind``: none, fp16 (dense:
    Horovod per tensor for one trial alone, else one allreduce), kept, kept-fp16 (the kept entries,
    one allreduce)."""
    if len(parts) > 1 and not fused:
        raise ValueError("several trials' gradients are averaged together only when they are fused")
    builders: dict[str, Callable[[], GradientSync]] = {
        "none": lambda: _dense(parts, fp16=False, fused=fused),
        "fp16": lambda: _dense(parts, fp16=True, fused=fused),
        "kept": lambda: FlatAverage(parts, fp16=False, kept_only=True),
        "kept-fp16": lambda: FlatAverage(parts, fp16=True, kept_only=True),
    }
    if kind not in builders:
        raise ValueError(f"unknown gradient compression {kind!r}; valid: {', '.join(builders)}")
    return builders[kind]()
