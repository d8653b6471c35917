"""Optimizers of the paper (SGD, heavy-ball momentum, Nesterov) and learning-rate schedules."""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from hvd_sparse.config import OptimConfig

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter], OptimConfig], torch.optim.Optimizer]

OPTIMIZERS: dict[str, OptimizerFactory] = {
    "sgd": lambda params, c: torch.optim.SGD(params, lr=c.lr),
    "momentum": lambda params, c: torch.optim.SGD(params, lr=c.lr, momentum=c.momentum),
    "nesterov": lambda params, c: torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, nesterov=True),
}


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; valid: {', '.join(sorted(OPTIMIZERS))}")
    return OPTIMIZERS[cfg.optimizer](params, cfg)


def learning_rate(cfg: OptimConfig, step: int, max_steps: int) -> float:
    """The learning rate of the update made at ``step`` (0-based), a pure function for resume.

    linear: TF's polynomial_decay with power 1, from lr to lr * end_factor over decay_steps
    (0 means max_steps), then constant.
    """
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "linear":
        decay = cfg.decay_steps or max_steps
        return cfg.lr * (1.0 - (1.0 - cfg.end_factor) * min(step, decay) / decay)
    raise ValueError(f"unknown schedule {cfg.schedule!r}; valid: constant, linear")


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
