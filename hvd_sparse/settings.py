"""The environment variables hvd_sparse reads, each checked where it is read: a bad value is a
ConfigError (one line, exit 2 on every rank, ``cli.guarded``), never a traceback, a silent default or
a watchdog quietly turned off.

| variable | meaning | valid |
|---|---|---|
| HVD_SPARSE_COLLECTIVE_TIMEOUT | seconds a rank may wait in a collective for the others (default 300) | 0 (never) or 1 to 604800 |
| HVD_SPARSE_LAUNCHER_GRACE | seconds the ranks of a job whose launcher died have to checkpoint and leave (default 10) | 0.5 to 3600 |
| HVD_SPARSE_HOROVOD_DEFAULTS | 0: leave Horovod's launch settings alone (default 1) | 0 or 1 |
| OMP_NUM_THREADS | intra-op threads per rank (default: the cores of the node shared by its ranks) | a positive integer (or OpenMP's list of them) |
"""
from __future__ import annotations

import math
import os

from hvd_sparse.config import ConfigError


def _seconds(name: str, default: float, low: float, high: float, zero_means: str | None = None) -> float:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if (zero_means and value == 0) or low <= value <= high:  # nan and inf fail both
        return value
    allowed = f"0 ({zero_means}) or " if zero_means else ""
    raise ConfigError(f"{name}={text!r}: must be {allowed}a number of seconds from {low:g} to {high:g}")


def collective_timeout() -> float:
    """Seconds a rank waits in a collective before it ends the job (0: never)."""
    return _seconds("HVD_SPARSE_COLLECTIVE_TIMEOUT", 300.0, 1.0, 7 * 86400.0, zero_means="never")


def launcher_grace() -> float:
    """Seconds between the launcher's death and the ranks' own exit."""
    return _seconds("HVD_SPARSE_LAUNCHER_GRACE", 10.0, 0.5, 3600.0)


def horovod_defaults() -> bool:
    text = os.environ.get("HVD_SPARSE_HOROVOD_DEFAULTS", "1")
    if text not in ("0", "1"):
        raise ConfigError(f"HVD_SPARSE_HOROVOD_DEFAULTS={text!r}: must be 0 or 1")
    return text == "1"


def omp_threads() -> int | None:
    """OMP_NUM_THREADS's first level, None when unset. torch ignores a value it cannot parse, and a rank
    then runs on every core of the node, as many times over as the node has ranks."""
    text = os.environ.get("OMP_NUM_THREADS")
    if text is None or text == "":
        return None
    levels = [level.strip() for level in text.split(",")]
    if not all(level.isascii() and level.isdigit() and int(level) > 0 for level in levels):
        raise ConfigError(f"OMP_NUM_THREADS={text!r}: must be a positive integer (threads per rank), or unset")
    return int(levels[0])


def check() -> None:
    """Every variable above, checked (ConfigError at the first bad one)."""
    collective_timeout()
    launcher_grace()
    horovod_defaults()
    omp_threads()
