"""One trial: build, prune with SNIP on rank 0, broadcast, train data-parallel, evaluate, log.

Run as ``horovodrun -np 2 python -m hvd_sparse.train --sparsity 0.9 ...`` (or under mpirun/srun).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from hvd_sparse import dist
from hvd_sparse.checkpoint import RunLock
from hvd_sparse.cli import configure_logging, guarded, parse_config, say
from hvd_sparse.config import Config, exact
from hvd_sparse.data import DATASETS
from hvd_sparse.engine import TrialResult, check_batch, load_data_everywhere, run_trial, select_device, validate
from hvd_sparse.log import check_writable
from hvd_sparse.models import MODELS
from hvd_sparse.optim import OPTIMIZERS
from hvd_sparse.pruning import PRUNING
from hvd_sparse.registry import plugin_digest

PROG = "hvd_sparse.train"


def log_path(cfg: Config) -> Path:
    c = cfg
    name = (
        f"{c.data.dataset}_{c.model.model}_{c.optim.optimizer}_s{exact(c.prune.sparsity)}"
        f"_b{c.train.batch_size}_{c.run_hash()}.h5"
    )
    return Path(c.run.out) / name


def start_job(cfg: Config) -> None:
    """Checks before any collective, then Horovod, logging and the checks that need the world size."""
    validate(cfg)
    dist.init(backend=cfg.dist.backend)
    configure_logging(cfg.run.log_level, dist.is_root())
    check_batch(cfg)
    dist.verify_same_everywhere(cfg.run_hash(), "configuration (every rank must be given the same arguments)")
    dist.verify_same_everywhere(plugin_digest(), "plug-ins (every rank must import the same code)")
    dist.on_root(lambda: check_writable(Path(cfg.run.out), "--out"), "checking the output folder")


def run(cfg: Config) -> TrialResult:
    """One trial on all ranks of the current Horovod job (resumed if it was interrupted)."""
    start_job(cfg)
    data = load_data_everywhere(cfg, select_device())
    path = log_path(cfg)
    lock = RunLock(path)
    dist.on_root(lock.acquire, "locking the run")
    try:
        return run_trial(cfg, path, data)
    finally:
        lock.release()


def report(result: TrialResult) -> int:
    if dist.is_root():
        reached = "-" if result.steps_to_result is None else result.steps_to_result
        test = "" if result.test_error is None else f" test_error={result.test_error:.4f}"
        say(
            f"{result.status}: steps_to_result={reached} best_val_error={result.best_val_error:.4f}{test} "
            f"steps={result.steps_done} world_size={result.world_size} density={result.density:.4f}\n"
            "layer density: " + " ".join(f"{n}={d:.3f}" for n, d in result.layer_density.items()) + "\n"
            f"log: {result.log_path}"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    names = lambda: {"dataset": list(DATASETS), "model": list(MODELS), "optimizer": list(OPTIMIZERS),  # noqa: E731
                     "prune_method": list(PRUNING)}
    return guarded(lambda: report(run(parse_config(argv, PROG, __doc__.splitlines()[0], names))), PROG)


if __name__ == "__main__":
    sys.exit(main())
