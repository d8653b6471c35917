"""Metaparameter search spaces as data, and their quasi-random (Sobol) points.

A space is a tuple of ``Param(name, low, high, scale)``; ``points`` maps the first n points of a
Sobol sequence (unscrambled by default, as the reference; the all-zeros first point skipped) onto
it. The points depend only on the space, n, skip and seed, never on the batch size, so every batch
size of a study grid reuses the same metaparameters.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

from scipy.stats import qmc

from hvd_sparse.config import ConfigError

SCALES = ("log", "reverse-log", "linear", "int")


@dataclass(frozen=True)
class Param:
    """One searched metaparameter; ``name`` is the config field it sets (lr, momentum, ...).

    Scales: ``log`` (log-uniform), ``reverse-log`` (log-uniform in 1 - value, for momenta close to
    1), ``linear`` (uniform) and ``int`` (uniform, rounded to the nearest integer).
    """

    name: str
    low: float
    high: float
    scale: str

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ConfigError(f"{self.name}: unknown scale {self.scale!r}; valid: {', '.join(SCALES)}")
        if not self.low < self.high:
            raise ConfigError(f"{self.name}: range [{self.low}, {self.high}] must have low < high")
        if self.scale == "log" and self.low <= 0:
            raise ConfigError(f"{self.name}: a log scale needs low > 0, got {self.low}")
        if self.scale == "reverse-log" and self.high >= 1:
            raise ConfigError(f"{self.name}: a reverse-log scale needs high < 1, got {self.high}")

    def value(self, u: float) -> float | int:
        """The value at position u in [0, 1] of the range (u=0 -> low, u=1 -> high)."""
        lo, hi = self.low, self.high
        if self.scale == "log":
            return math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
        if self.scale == "reverse-log":
            return 1.0 - math.exp(math.log(1 - lo) + u * (math.log(1 - hi) - math.log(1 - lo)))
        if self.scale == "int":
            return int(round(lo + u * (hi - lo)))
        return lo + u * (hi - lo)


@dataclass(frozen=True)
class SearchSpace:
    params: tuple[Param, ...]

    def __post_init__(self) -> None:
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ConfigError(f"search space names a metaparameter twice: {names}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def points(self, n: int, skip: int = 1, seed: int | None = None) -> list[dict[str, float | int]]:
        """The first n points after ``skip``; ``seed`` turns on Owen scrambling (None: unscrambled)."""
        if n < 1 or skip < 0:
            raise ConfigError(f"need n >= 1 points and skip >= 0, got n={n}, skip={skip}")
        if not self.params:
            return [{} for _ in range(n)]
        sampler = qmc.Sobol(d=len(self.params), scramble=seed is not None, seed=seed)
        if skip:  # fast_forward(0) overflows in scipy 1.17
            sampler.fast_forward(skip)
        with warnings.catch_warnings():  # skipping the first point breaks the power-of-2 balance, knowingly
            warnings.filterwarnings("ignore", message="The balance properties of Sobol", category=UserWarning)
            unit = sampler.random(n)
        return [{p.name: p.value(float(u)) for p, u in zip(self.params, row)} for row in unit]

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {p.name: {"range": [p.low, p.high], "scale": p.scale} for p in self.params}

    @classmethod
    def from_dict(cls, d: Mapping[str, Mapping[str, Any]]) -> "SearchSpace":
        params = []
        for name, spec in d.items():
            try:
                low, high = (float(v) for v in spec["range"])
                scale = str(spec["scale"])
            except (KeyError, TypeError, ValueError):
                raise ConfigError(f"search space entry {name!r} must look like {{range: [low, high], scale: log}}") from None
            params.append(Param(name, low, high, scale))
        return cls(tuple(params))


def reference_space(optimizer: str, schedule: str) -> SearchSpace:
    """The reference's search space (Shallue et al. 2019, as used by the paper)."""
    params = [Param("lr", 1e-4, 1.0, "log")]
    if optimizer in ("momentum", "nesterov"):
        params.append(Param("momentum", 0.9, 0.9999, "reverse-log"))
    if schedule == "linear":
        params += [Param("decay_steps", 30000, 60000, "int"), Param("end_factor", 1e-4, 0.1, "log")]
    return SearchSpace(tuple(params))
