"""What every benchmark script shares: the real CLIs under horovodrun, a wall-time window read back
from a trial's log, the benchmark study, and interleaved repeats with their medians.

Scripts import this module only (never each other); their figures go to BENCHMARKS.md, printed by
the scripts themselves, with the command beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

from hvd_sparse.log import read_log

BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
CORES = os.cpu_count()

# The benchmark trial: Simple-CNN on the bundled digits at sparsity 0.9, Nesterov, goal error 0 (so it
# runs its whole budget), SNIP over one batch (start-up is not what is timed).
TRAIN = {"dataset": "mnist5k", "model": "simple-cnn", "sparsity": "0.9", "optimizer": "nesterov", "lr": "0.01",
         "momentum": "0.9", "goal-error": "0", "snip-batches": "1", "log-level": "warning"}


def launch(np_: int, args: Sequence[str], env: Mapping[str, str] | None = None,
           engine: str = "horovod") -> subprocess.CompletedProcess:
    """``horovodrun -np N python ARGS`` (plain ``python ARGS`` at np=1 when asked with np_=0; ``torchrun
    --standalone --nproc-per-node N ARGS`` for the torch engine); fails loudly."""
    if np_ == 0:
        cmd = [sys.executable, *args]
    elif engine == "torch":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(np_), *args]
    else:
        cmd = [str(BIN / "horovodrun"), "-np", str(np_), sys.executable, *args]
    proc = subprocess.run(cmd, env=dict(env or ENV), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def timed(np_: int, args: Sequence[str], env: Mapping[str, str] | None = None, engine: str = "horovod") -> float:
    """Seconds of the whole command, launch included."""
    t0 = time.perf_counter()
    launch(np_, args, env, engine)
    return time.perf_counter() - t0


def train_flags(**overrides: object) -> list[str]:
    """The benchmark trial's ``hvd_sparse.train`` flags; ``overrides`` by flag name with '_' for '-'."""
    flags = {**TRAIN, **{k.replace("_", "-"): str(v) for k, v in overrides.items()}}
    return [item for name, value in flags.items() for item in (f"--{name}", value)] + ["--no-progress"]


def train_window(np_: int, start: int, end: int, env: Mapping[str, str] | None = None, engine: str = "horovod",
                 **overrides: object) -> float:
    """Seconds between the logged evaluations at steps ``start`` and ``end`` of one ``hvd_sparse.train``
    run (max steps ``end``, an evaluation every ``start`` steps unless overridden): steps and evaluations
    only, start-up and SNIP left out."""
    overrides = {"max_steps": end, "eval_every": start, **overrides}
    with tempfile.TemporaryDirectory() as out:
        launch(np_, ["-m", "hvd_sparse.train", *train_flags(**overrides), "--out", out], env, engine)
        (log,) = Path(out).glob("*.h5")
        m = read_log(log, with_mask=False).measurements
        at = m["step"].tolist()
        return float(m["wall_time"][at.index(end)] - m["wall_time"][at.index(start)])


def ms_per_step(np_: int = 2, steps: int = 400, env: Mapping[str, str] | None = None, **overrides: object) -> float:
    """ms per step of the benchmark trial: the window between the evaluations at steps/2 and steps."""
    return train_window(np_, steps // 2, steps, env, **overrides) / (steps // 2) * 1000


def peer_ms(mode: str, batch: int, env: Mapping[str, str] | None = None) -> float:
    """ms per step of a peer loop of benchmarks/peers.py (horovod, ddp-prune or compute)."""
    args = [str(HERE / "peers.py"), mode, "220", str(batch)]
    if mode == "ddp-prune":
        args = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531", *args]
    proc = launch(2 if mode == "horovod" else 0, args, env)
    (value,) = re.findall(r"ms_per_step ([0-9.]+\d)", proc.stdout)  # launchers may glue other ranks' tags on
    return float(value)


def interleaved(variants: Mapping[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Each repeat runs every variant once, in order, so the drifts of a shared machine hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            times[name].append(run())
    return times


def medians(times: Mapping[object, list[float]]) -> dict:
    return {name: statistics.median(values) for name, values in times.items()}


def mean_ms(fn: Callable[[], object], repeats: int) -> float:
    """Mean ms of ``fn()`` over ``repeats`` calls, after one call of warm-up."""
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1000


# -- the benchmark study (study_throughput.py, trial_packing.py) -------------------------------------


def add_study_arguments(parser: argparse.ArgumentParser, snip_batches: int) -> None:
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--snip-batches", type=int, default=snip_batches, help="SNIP batches of 100 (0: a full pass, the reference)")
    parser.add_argument("--model", default="simple-cnn")
    parser.add_argument("--repeats", type=int, default=1)


def study_of(args: argparse.Namespace) -> tuple[dict, str]:
    """The spec of ``add_study_arguments``' options, and its description for a table's title."""
    spec = {
        "name": "throughput", "dataset": "mnist5k", "model": args.model, "sparsities": [0.9],
        "optimizers": ["nesterov"], "batch_sizes": [args.batch_size], "trials": args.trials, "goal_error": 0.0,
        "max_steps": args.steps, "eval_every": 100,
        "search": {"lr": {"range": [0.005, 0.1], "scale": "log"}, "momentum": {"range": [0.9, 0.99], "scale": "reverse-log"}},
        "config": {"prune": {"snip_batches": args.snip_batches}},
    }
    return spec, (f"{args.trials} trials of {args.steps} steps, {args.model} on mnist5k, sparsity 0.9, global batch "
                  f"{args.batch_size}, SNIP batches {args.snip_batches or 'all'}")


def spec_file(spec: dict, folder: Path) -> Path:
    path = folder / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def study_seconds(np_: int, spec_path: Path, out: Path, *extra: str, engine: str = "horovod") -> float:
    """Seconds of one ``hvd_sparse.study`` job over the whole spec (np_=0: plain python, one rank)."""
    return timed(np_, ["-m", "hvd_sparse.study", str(spec_path), "--out", str(out), *extra], engine=engine)

