"""Optimizers of the paper (SGD, heavy-ball momentum, Nesterov) built from OptimConfig."""
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
