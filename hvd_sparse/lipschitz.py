"""The gradient's Lipschitz smoothness along the update, measured as the paper's authors do.

At the step before a multiple of K, keep the weights w_prev and the full-training-split gradient
g_prev (mean cross-entropy, through the mask); after the optimizer step, w_next. For gamma in
0.1, ..., 0.9, at w_g = (1 - gamma) w_prev + gamma w_next:

    L_g = ||g(w_g) - g_prev|| / ||gamma (w_next - w_prev)||

and the measurement is the largest L_g. Each full gradient is data-parallel: the training split is
cut into chunks (the evaluation batch size), rank r sums the loss gradient over chunks r, r + np,
..., and one allreduce adds the ranks' sums up, so a measurement costs each rank 10/np passes over
the split. The chunks do not depend on the world size, so np=1 and np=2 add the very same chunk
gradients (in float64), only in another order. The weights are put back bitwise and no ``p.grad``
or optimizer state is touched, so measuring never changes the trajectory.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
from torch import nn

from hvd_sparse.config import Config, ConfigError
from hvd_sparse.data import Examples
from hvd_sparse.mask import Mask
from hvd_sparse.measure import MEASUREMENTS, Measurement, Trial
from hvd_sparse.models import cross_entropy_sum

GAMMAS = tuple(round(0.1 * i, 1) for i in range(1, 10))


def due(step: int, every: int) -> bool:
    """Whether the optimizer step taken at ``step`` (to step + 1) is measured."""
    return every > 0 and (step + 1) % every == 0


class LipschitzProbe:
    """Measures one trial's model. ``loss_sum(outputs, targets)`` is the loss summed over the examples
    (the training loss is its mean); ``reduce`` sums a tensor over the ranks (the identity at one rank)."""

    def __init__(self, model: nn.Module, mask: Mask, train: Examples, batch_size: int,
                 rank: int, world: int, reduce: Callable[[torch.Tensor], torch.Tensor],
                 loss_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy_sum):
        """``train``: the whole training split; this rank takes its chunks of it."""
        self.model, self.train, self.reduce, self.loss_sum = model, train, reduce, loss_sum
        n = len(train)
        self.chunks = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)][rank::world]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.keep = [None if m is None else m.to(p.device) for m, p in zip(mask.by_parameter(model), self.params)]
        self.w_prev: list[torch.Tensor] = []
        self.g_prev = torch.zeros(0)

    def full_gradient(self) -> torch.Tensor:
        """The mean loss's gradient over the whole training split, masked, flat, float64."""
        total = torch.zeros(sum(p.numel() for p in self.params), dtype=torch.float64, device=self.train.device)
        was_training = self.model.training
        self.model.eval()  # the same as train mode for these models (no dropout, no batch norm), and says so
        for start, stop in self.chunks:
            x, y = self.train.rows(start, stop)
            loss = self.loss_sum(self.model(x), y)
            grads = torch.autograd.grad(loss, self.params)  # leaves p.grad (and Horovod's hooks) alone
            total += torch.cat([g.reshape(-1) for g in grads]).double()
        self.model.train(was_training)
        return self._masked(self.reduce(total) / len(self.train))

    def _masked(self, flat: torch.Tensor) -> torch.Tensor:
        parts = flat.split([p.numel() for p in self.params])
        return torch.cat([part if keep is None else part * keep.reshape(-1) for part, keep in zip(parts, self.keep)])

    def before_step(self) -> None:
        """Keep w_prev and g_prev (call right before the optimizer step that is measured)."""
        self.w_prev = [p.detach().clone() for p in self.params]
        self.g_prev = self.full_gradient()

    @torch.no_grad()
    def _set(self, weights: list[torch.Tensor]) -> None:
        for p, w in zip(self.params, weights):
            p.copy_(w)

    def after_step(self) -> tuple[float, list[float]]:
        """(max over gamma of L_g, [L_g per gamma]) with the weights after the step, which stay as they were."""
        w_next = [p.detach().clone() for p in self.params]
        moved = torch.cat([(b - a).reshape(-1) for a, b in zip(self.w_prev, w_next)]).double()
        per_gamma = []
        try:
            for gamma in GAMMAS:
                self._set([a + gamma * (b - a) for a, b in zip(self.w_prev, w_next)])
                step = float((gamma * moved).norm())
                change = float((self.full_gradient() - self.g_prev).norm())
                per_gamma.append(change / step if step > 0 else math.nan)
        finally:
            self._set(w_next)  # bitwise the weights the optimizer made
        finite = [v for v in per_gamma if math.isfinite(v)]
        return (max(finite) if finite else math.nan), per_gamma


@MEASUREMENTS.register("lipschitz")
class LipschitzMeasurement(Measurement):
    """The Lipschitz constant along the update every ``--lipschitz-every`` steps, one row of the log's
    ``lipschitz`` table (step, value, per_gamma; attribute gammas) per measurement."""

    name = "lipschitz"
    table_attrs = {"gammas": GAMMAS}

    def __init__(self, trial: Trial):
        super().__init__(trial)
        self.probe = LipschitzProbe(trial.model, trial.mask, trial.train, trial.cfg.train.eval_batch_size, trial.rank,
                                    trial.world, reduce=lambda t: trial.sum_over_ranks(t.cpu()).to(t.device),
                                    loss_sum=trial.loss_sum)

    @classmethod
    def wants(cls, cfg: Config) -> bool:
        return cfg.train.lipschitz_every > 0

    @classmethod
    def check(cls, cfg: Config, world: int, fused: bool, normalizes: str) -> None:
        if fused:
            raise ConfigError("fused trials do not measure the Lipschitz constant: fuse 1, or lipschitz_every 0")
        if normalizes:
            raise ConfigError(f"{normalizes}: the Lipschitz probe runs in evaluation mode, where they are not used: "
                              "lipschitz_every 0")

    def due(self, step: int) -> bool:
        return due(step, self.trial.cfg.train.lipschitz_every)

    def before_step(self) -> None:
        self.probe.before_step()

    def after_step(self) -> dict[str, Any]:
        value, per_gamma = self.probe.after_step()
        return {"value": value, "per_gamma": per_gamma}

    def describe(self, step: int, record: Mapping[str, Any]) -> str:
        g = record["per_gamma"]
        return (f"step {step}: Lipschitz constant {record['value']:.4g} (the largest along the update; "
                f"gamma 0.1: {g[0]:.4g}, 0.9: {g[-1]:.4g})")
