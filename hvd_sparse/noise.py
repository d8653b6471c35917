"""The gradient noise scale B_simple = tr(Sigma) / |G|^2, measured almost for free from data parallelism.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training", Appendix A.1): for a gradient
estimated on a batch of B examples, E|g_B|^2 = |G|^2 + tr(Sigma) / B. Two batch sizes of the same
step give two equations, hence unbiased estimates of both unknowns:

    |G|^2     ~ (B_big |g_big|^2 - B_small |g_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|g_small|^2 - |g_big|^2) / (1 / B_small - 1 / B_big)

Data parallelism has both for the price of one scalar allreduce: each rank's local gradient is a
gradient of B_small = B / k examples (the mean of the k squared norms is the estimate of E|g_small|^2),
and the averaged gradient is one of B_big = B. At np=1 the batch is split in two halves instead. The
two estimates are each smoothed with an exponential moving average over measurements (bias-corrected,
so the first measurements are not pulled towards 0) and B_simple is the ratio of the two averages.
Only unpruned entries count: the gradients are masked before their norms are taken.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from hvd_sparse.config import Config, ConfigError
from hvd_sparse.measure import MEASUREMENTS, Measurement, Trial


@dataclass
class NoiseScale:
    """Bias-corrected EMAs of the two unbiased estimates; ``state`` goes into checkpoints."""

    smoothing: float  # EMA factor in [0, 1): 0 keeps only the latest measurement
    g2: float = 0.0  # EMA of the |G|^2 estimates (not yet bias-corrected)
    trace: float = 0.0  # EMA of the tr(Sigma) estimates
    weight: float = 0.0  # 1 - smoothing^measurements: the bias correction

    def update(self, small_sq: float, big_sq: float, b_small: int, b_big: int) -> None:
        if not 0 < b_small < b_big:
            raise ValueError(f"need 0 < B_small < B_big, got {b_small} and {b_big}")
        g2 = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
        trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
        a = self.smoothing
        self.g2, self.trace = a * self.g2 + (1 - a) * g2, a * self.trace + (1 - a) * trace
        self.weight = a * self.weight + (1 - a)

    @property
    def grad_sq(self) -> float:
        """Smoothed estimate of |G|^2 (NaN before the first measurement)."""
        return self.g2 / self.weight if self.weight else math.nan

    @property
    def grad_trace(self) -> float:
        """Smoothed estimate of tr(Sigma), the per-example gradient variance summed over entries."""
        return self.trace / self.weight if self.weight else math.nan

    @property
    def b_simple(self) -> float:
        """tr(Sigma) / |G|^2; NaN before any measurement or while either estimate is not positive
        (too few measurements of a gradient that is nearly all noise: the estimate says nothing yet)."""
        g2, trace = self.grad_sq, self.grad_trace
        return trace / g2 if g2 > 0 and trace > 0 else math.nan

    @property
    def state(self) -> tuple[float, float, float]:
        return (self.g2, self.trace, self.weight)

    def restore(self, state: tuple[float, ...]) -> None:
        if state:
            self.g2, self.trace, self.weight = (float(v) for v in state)


def masked_sq_norm(grads: list[torch.Tensor], masks: list[torch.Tensor | None]) -> torch.Tensor:
    """Sum of squares of the unpruned gradient entries, in float64."""
    total = torch.zeros((), dtype=torch.float64, device=grads[0].device)
    for g, m in zip(grads, masks):
        kept = g if m is None else g * m
        total += kept.double().square().sum()
    return total


def _part_gradients(losses_of: Callable[[slice], list[torch.Tensor]], part: slice, flat: list[torch.Tensor],
                    micro_batch: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(each model's mean loss on ``part``, detached; the gradient of their sum), ``micro_batch`` examples
    at a time when it is smaller than the part."""
    size = part.stop - part.start
    step = micro_batch if 0 < micro_batch < size else size
    pieces = [slice(start, min(start + step, part.stop)) for start in range(part.start, part.stop, step)]
    grads: list[torch.Tensor] | None = None
    total: list[torch.Tensor] | None = None
    for piece in pieces:  # one piece: weight 1.0, an exact product, so the bits of one pass
        weight = (piece.stop - piece.start) / size
        piece_losses = [loss * weight for loss in losses_of(piece)]
        piece_grads = torch.autograd.grad(piece_losses[0] if len(piece_losses) == 1 else torch.stack(piece_losses).sum(), flat)
        grads = list(piece_grads) if grads is None else [g.add_(h) for g, h in zip(grads, piece_grads)]
        detached = [loss.detach() for loss in piece_losses]
        total = detached if total is None else [a + b for a, b in zip(total, detached)]
    assert grads is not None and total is not None
    return total, grads


def local_gradients(models: Sequence[nn.Module], losses_of: Callable[[slice], list[torch.Tensor]], n: int,
                    masks: Sequence[list[torch.Tensor | None]], halves: bool,
                    micro_batch: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Put each model's gradient of its loss on this rank's ``n`` examples into every ``p.grad`` without
    starting an allreduce (``autograd.grad`` does not run the gradient-accumulator hooks Horovod
    listens to; the synchronize that follows reduces every gradient), and return (each model's loss,
    [models] |masked local gradient|^2). ``losses_of(part)``: each model's mean loss on that slice of
    its examples (several models: fused trials, whose passes are shared).

    With ``halves`` (np=1) the batch is taken as two halves: the gradient is the mean of the two
    half-batch gradients (the full-batch gradient, summed in another order) and the squared norm is
    the mean of theirs, a gradient of B/2 examples. ``micro_batch`` > 0: each part is passed through
    in pieces of at most that many examples, each piece's gradient weighted by its share of the part
    (the part's mean gradient, summed in another order; the memory of one piece at a time).
    """
    params = [[p for p in model.parameters() if p.requires_grad] for model in models]
    flat = [p for per_model in params for p in per_model]
    parts = (slice(0, n // 2), slice(n // 2, n)) if halves else (slice(0, n),)
    totals = [torch.zeros_like(p) for p in flat]
    sq = torch.zeros(len(models), dtype=torch.float64, device=flat[0].device)
    losses = []
    for part in parts:
        part_losses, grads = _part_gradients(losses_of, part, flat, micro_batch)
        start = 0
        for i, per_model in enumerate(params):
            sq[i] += masked_sq_norm(list(grads[start : start + len(per_model)]), masks[i])
            start += len(per_model)
        for t, g in zip(totals, grads):
            t.add_(g)
        losses.append(torch.stack(part_losses))
    for p, t in zip(flat, totals):
        if len(parts) > 1:
            t.div_(len(parts))
        if p.grad is None:
            p.grad = t
        else:  # a view into FlatAverage's flat buffer: keep it
            p.grad.copy_(t)
    return list(torch.stack(losses).mean(dim=0)), sq / len(parts)


@MEASUREMENTS.register("noise_scale")
class NoiseScaleMeasurement(Measurement):
    """B_simple every ``--noise-scale-every`` steps: this rank's |masked local gradient|^2 (a batch of
    B/k, at np=1 the mean over two halves of B/2) averaged over the ranks, beside |averaged gradient|^2
    (a batch of B); the smoothed estimates go into every evaluation row and into checkpoints."""

    name = "noise_scale"
    needs_local_gradient = True

    def __init__(self, trial: Trial):
        super().__init__(trial)
        self.noise = NoiseScale(trial.cfg.train.noise_scale_smoothing)
        self.kept = trial.kept
        self.big_sq = math.nan

    @classmethod
    def wants(cls, cfg: Config) -> bool:
        return cfg.train.noise_scale_every > 0

    @classmethod
    def check(cls, cfg: Config, world: int, fused: bool, normalizes: str) -> None:
        batch = cfg.train.batch_size
        if world == 1 and (batch < 2 or batch % 2):
            raise ConfigError(f"--noise-scale-every at np=1 splits the batch in two halves: --batch-size {batch} "
                              "must be even")
        if normalizes:
            raise ConfigError(f"{normalizes}: the noise scale's local gradients and half batches, and micro-batches, "
                              "would each be normalized by the statistics of a part of the batch: noise_scale_every 0 "
                              "and micro_batch_size 0")

    def due(self, step: int) -> bool:
        return step % self.trial.cfg.train.noise_scale_every == 0

    def after_average(self, local_sq: float | None) -> torch.Tensor:
        params = [p.grad for p in self.trial.model.parameters() if p.requires_grad]
        self.big_sq = masked_sq_norm(params, self.kept).item()
        return torch.tensor([math.nan if local_sq is None else local_sq], dtype=torch.float64)

    def averaged(self, values: torch.Tensor) -> None:
        batch = self.trial.cfg.train.batch_size
        self.noise.update(float(values[0]), self.big_sq, batch // max(self.trial.world, 2), batch)

    def row(self) -> dict[str, float]:
        return {"noise_scale": self.noise.b_simple, "grad_sq": self.noise.grad_sq, "grad_trace": self.noise.grad_trace}

    @property
    def state(self) -> tuple[float, ...]:
        return self.noise.state

    def restore(self, state: tuple[float, ...]) -> None:
        self.noise.restore(state)
