"""BatchNorm over the global batch: the same optimization at any number of ranks.

A BatchNorm layer in training mode normalizes by the statistics of the batch it sees. At np=k each
rank sees a shard, so plain BatchNorm would train another network than np=1 does. ``SyncedBatchNorm``
takes its statistics over the whole global batch instead: each rank's per-channel sum and count are
summed across ranks, then the sum of squared deviations from that global mean (two passes, as
numerically sound as one rank's own). The sums are differentiable (``SumOverRanks``: its backward is
the same sum over the gradients), so the gradient of each rank's share of the loss reaches the
activations of every rank, and the averaged gradient is the one of np=1 up to float summation order.

``synced(model)`` puts it in place of every ``nn.BatchNorm1d/2d/3d`` of a model, at any world size
(np=1 runs the same arithmetic as np=k). Same parameters and buffers, same state_dict keys, so a
checkpoint moves between the two freely. In evaluation mode it is plain BatchNorm (running
statistics, no collective). The running variance is the unbiased one of the global batch, as torch's.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from hvd_sparse import dist

_local = [False]  # True inside ``local_statistics()``


@contextmanager
def local_statistics() -> Iterator[None]:
    """Inside: a SyncedBatchNorm in training mode uses the statistics of the batch it sees, with no
    collective (for work that one rank does alone, such as a pruning score on rank 0)."""
    _local.append(True)
    try:
        yield
    finally:
        _local.pop()


class SumOverRanks(torch.autograd.Function):
    """The sum of a tensor over all ranks; its gradient is the sum of the incoming gradients over all
    ranks (every rank's loss depends on every rank's contribution)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 - autograd's own signature
        ctx.alone = _local[-1] or dist.size() == 1
        return t.clone() if ctx.alone else dist.allreduce_sum(t.detach().cpu(), "batchnorm.statistics").to(t.device)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        if ctx.alone:
            return grad
        return dist.allreduce_sum(grad.detach().contiguous().cpu(), "batchnorm.gradient").to(grad.device)


class SyncedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training-mode statistics are those of the global batch (any input rank >= 2)."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions (N, C, ...), got {x.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:  # evaluation: as plain BatchNorm, on this rank's own examples, no collective
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()  # float32 activations under autocast too (as torch's own batch_norm)
        # the sums over ranks in float64: the count exact at any size, the mean as sound as one rank's
        count_here = torch.tensor([x.numel() // x.shape[1]], dtype=torch.float64, device=x.device)
        summed = SumOverRanks.apply(torch.cat([xf.sum(dims).double(), count_here]))
        count = summed[-1].detach()
        mean = (summed[:-1] / count).float()
        centered = xf - mean.reshape(shape)
        var = (SumOverRanks.apply((centered * centered).sum(dims).double()) / count).float()
        y = centered * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach(), float(count))
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        self.num_batches_tracked += 1
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * (count / max(count - 1.0, 1.0))
        self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
        self.running_var.mul_(1 - momentum).add_(unbiased.to(self.running_var.dtype), alpha=momentum)


PLAIN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)  # replaced; other kinds are refused at np > 1


def synced(model: nn.Module) -> nn.Module:
    """``model`` with each of its BatchNorm layers of torch's own kinds replaced (in place) by a
    SyncedBatchNorm holding the very same parameters and buffers; the model itself when it has none.
    A subclass (its own forward) or a lazy BatchNorm is left as it is (``unsynced`` names them)."""
    for name, child in model.named_children():
        if type(child) in PLAIN:
            setattr(model, name, _replacement(child))
        else:
            synced(child)
    return model


def _replacement(norm: nn.modules.batchnorm._BatchNorm) -> SyncedBatchNorm:
    new = SyncedBatchNorm(norm.num_features, norm.eps, norm.momentum, norm.affine, norm.track_running_stats)
    if norm.affine:
        new.weight, new.bias = norm.weight, norm.bias
    if norm.track_running_stats:
        new.running_mean, new.running_var, new.num_batches_tracked = norm.running_mean, norm.running_var, norm.num_batches_tracked
    new.train(norm.training)
    return new


def batch_statistics(model: nn.Module) -> list[str]:
    """The names of the layers of ``model`` that normalize by batch statistics in training mode."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def unsynced(model: nn.Module) -> list[str]:
    """The layers that would normalize by one rank's statistics: BatchNorm kinds ``synced`` does not
    replace, and those without running statistics (their evaluation uses the batch's statistics too)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and (not isinstance(m, SyncedBatchNorm) or not m.track_running_stats)]
