"""Measurements taken while a trial trains: one interface the engine calls, one file per measurement.

A measurement (the gradient noise scale in ``noise.py``, the Lipschitz constant in ``lipschitz.py``)
subclasses ``Measurement`` and registers itself with ``@MEASUREMENTS.register(name)``; the engine
builds one per trial whose configuration ``wants`` it and calls, at each step it is ``due``:

1. ``before_step()`` before the step's forward pass (the weights and gradients of the previous step);
2. when it ``needs_local_gradient``, the engine computes each rank's own gradient before averaging
   (at np=1 as two half batches) and hands its masked squared norm to ``after_average``;
3. ``after_average(local_sq)`` once the gradients in ``p.grad`` are the average over ranks: it may
   return values (a 1-D float64 tensor) to be averaged over the ranks, which come back in ``averaged``
   (every measurement of every trial in one allreduce);
4. ``after_step()`` after the optimizer step: a record (a mapping of scalars or 1-D arrays) for the
   measurement's own table in the log (group ``name``, one row per record, with ``table_attrs``; its
   ``describe(step, record)`` is the line logged), or None.

Besides, ``row()`` gives the measurement's columns of each evaluation row in the log, and ``state``/
``restore`` what a checkpoint keeps of it, so that a resumed trial measures exactly what an
uninterrupted one does. Everything here runs on every rank, in the same order; the steps 2-4 only where
the step's averaged gradient is finite (the step is taken). ``check`` refuses, with one line, the
configurations a measurement cannot measure exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import nn

from hvd_sparse.config import Config
from hvd_sparse.data import Examples
from hvd_sparse.mask import Mask
from hvd_sparse.registry import Registry


@dataclass(frozen=True)
class Trial:
    """What a measurement may use of the trial it measures."""

    cfg: Config
    model: nn.Module
    mask: Mask
    train: Examples  # the whole training split (this rank's shard of a batch is the engine's)
    loss_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # the model's loss summed over examples
    rank: int
    world: int
    sum_over_ranks: Callable[[torch.Tensor], torch.Tensor]  # a tensor's sum over the ranks (identity at np=1)

    @property
    def kept(self) -> list[torch.Tensor | None]:
        """The mask of each trainable parameter, in model order (None: not pruned)."""
        return self.mask.by_parameter(self.model)


class Measurement:
    """One quantity measured during training; see the module's doc for when each method is called."""

    name: ClassVar[str] = ""
    needs_local_gradient: ClassVar[bool] = False
    table_attrs: ClassVar[Mapping[str, Any]] = {}  # attributes of its table in the log

    def __init__(self, trial: Trial):
        self.trial = trial

    @classmethod
    def wants(cls, cfg: Config) -> bool:
        """Whether a trial of this configuration takes this measurement."""
        return False

    @classmethod
    def check(cls, cfg: Config, world: int, fused: bool, normalizes: str) -> None:
        """Raise ConfigError (one line) where it cannot be measured exactly, at ``world`` ranks, in fused
        trials, or for a model that normalizes by batch statistics (``normalizes`` says which layers; ''
        when none); the same answer on every rank."""

    def due(self, step: int) -> bool:
        """Whether the step taken at ``step`` (to step + 1) is measured."""
        return False

    def before_step(self) -> None:
        """Before the forward pass of a step it is ``due`` at: the weights and gradients of the previous
        step are still there; it may run its own passes (``self.trial``)."""

    def after_average(self, local_sq: float | None) -> torch.Tensor | None:
        """Once ``p.grad`` holds the masked average over the ranks. ``local_sq`` is this rank's masked
        local gradient's squared norm when the class sets ``needs_local_gradient`` (at np=1: the mean over
        two half batches), else None. Return a 1-D float64 tensor to have it averaged over the ranks (it
        comes back in ``averaged``), or None."""
        return None

    def averaged(self, values: torch.Tensor) -> None:
        """The average over the ranks of what ``after_average`` returned (every measurement of every trial
        in one allreduce)."""

    def after_step(self) -> Mapping[str, Any] | None:
        """After the optimizer step: a record (scalars or 1-D arrays) for the measurement's own table in
        the log (group ``name``, one row per record, with ``table_attrs``), or None."""
        return None

    def describe(self, step: int, record: Mapping[str, Any]) -> str:
        """The line rank 0 logs for a record."""
        return f"step {step}: {self.name} {dict(record)}"

    def row(self) -> dict[str, float]:
        """Its columns of each evaluation row in the log (``measurements/<column>``)."""
        return {}

    @property
    def state(self) -> tuple[float, ...]:
        """What a checkpoint keeps of it, so that a resumed trial measures exactly what an uninterrupted
        one does."""
        return ()

    def restore(self, state: tuple[float, ...]) -> None:
        """Take back the ``state`` a checkpoint kept (on resume)."""


MEASUREMENTS: Registry[type[Measurement]] = Registry("measurement")


def wanted(cfg: Config) -> list[type[Measurement]]:
    """The measurement classes a trial of ``cfg`` takes, in the order of their names."""
    import hvd_sparse.lipschitz  # noqa: F401 - the built-in measurements register on import
    import hvd_sparse.noise  # noqa: F401

    return [cls for cls in (MEASUREMENTS[name] for name in MEASUREMENTS) if cls.wants(cfg)]


def measurements_for(trial: Trial) -> list[Measurement]:
    """The measurements a trial of ``trial.cfg`` takes."""
    return [cls(trial) for cls in wanted(trial.cfg)]


def check_measurements(cfg: Config, world: int, fused: bool, normalizes: str = "") -> None:
    """Every measurement ``cfg`` asks for can be taken exactly here (``Measurement.check``)."""
    for cls in wanted(cfg):
        cls.check(cfg, world, fused, normalizes)


def average_contributions(contributions: list[tuple[Measurement, torch.Tensor]],
                          mean_over_ranks: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """The values of every measurement that gave some, averaged over the ranks in one allreduce, each
    back to its measurement."""
    if not contributions:
        return
    values = torch.cat([v.reshape(-1).double().cpu() for _, v in contributions])
    mean = mean_over_ranks(values)
    start = 0
    for m, v in contributions:
        m.averaged(mean[start : start + v.numel()])
        start += v.numel()
