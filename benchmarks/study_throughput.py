"""Trials per hour: a study's trials inside one Horovod job vs one horovodrun launch per trial.

    python benchmarks/study_throughput.py [--np 2] [--trials 12] [--steps 200] [--batch-size 32] [--snip-batches 0] [--model simple-cnn]

Both sides run the same short trials (Simple-CNN on mnist5k, sparsity 0.9, Nesterov, goal error 0
so every trial runs its whole step budget, evaluation every 100 steps, SNIP over ``--snip-batches``) through the real CLIs:
``horovodrun -np N python -m hvd_sparse.study SPEC`` once, and ``horovodrun -np N python -m
hvd_sparse.train ...`` once per trial with the same configuration. Wall time of each side, whole
commands included (launch, imports, Horovod start-up, data loading, SNIP). The two sides alternate
``--repeats`` times and the medians are reported.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hvd_sparse.study import StudySpec, grid

BIN = Path(sys.executable).parent


def spec_dict(trials: int, steps: int, batch_size: int, snip_batches: int, model: str = "simple-cnn") -> dict:
    return {
        "name": "throughput", "dataset": "mnist5k", "model": model, "sparsities": [0.9],
        "optimizers": ["nesterov"], "batch_sizes": [batch_size], "trials": trials, "goal_error": 0.0,
        "max_steps": steps, "eval_every": 100,
        "search": {"lr": {"range": [0.005, 0.1], "scale": "log"}, "momentum": {"range": [0.9, 0.99], "scale": "reverse-log"}},
        "config": {"prune": {"snip_batches": snip_batches}},
    }


def timed(cmd: list[str]) -> float:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    return time.perf_counter() - t0


def one_job(np_: int, spec_path: Path, out: Path, *extra: str) -> float:
    study = [sys.executable, "-m", "hvd_sparse.study", str(spec_path), "--out", str(out), *extra]
    return timed(study if np_ == 1 else [str(BIN / "horovodrun"), "-np", str(np_), *study])


def one_launch_per_trial(np_: int, spec: StudySpec, out: Path) -> float:
    total = 0.0
    for trial in grid(spec):
        c = trial.config
        flags = [
            "--dataset", c.data.dataset, "--model", c.model.model, "--sparsity", str(c.prune.sparsity),
            "--optimizer", c.optim.optimizer, "--lr", repr(c.optim.lr), "--momentum", repr(c.optim.momentum),
            "--batch-size", str(c.train.batch_size), "--max-steps", str(c.train.max_steps),
            "--eval-every", str(c.train.eval_every), "--goal-error", str(c.train.goal_error),
            "--seed", str(c.train.seed), "--snip-batches", str(c.prune.snip_batches), "--no-progress", "--log-level", "warning", "--out", str(out),
        ]
        total += timed([str(BIN / "horovodrun"), "-np", str(np_), sys.executable, "-m", "hvd_sparse.train", *flags])
    return total


def add_study_arguments(parser: argparse.ArgumentParser, snip_batches: int) -> None:
    """The benchmark study's options (shared with trial_packing.py)."""
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--snip-batches", type=int, default=snip_batches, help="SNIP batches of 100 (0: a full pass, the reference)")
    parser.add_argument("--model", default="simple-cnn")
    parser.add_argument("--repeats", type=int, default=1)


def study_of(args: argparse.Namespace) -> tuple[dict, str]:
    """The spec of ``add_study_arguments``' options, and its description for a table's title."""
    spec_d = spec_dict(args.trials, args.steps, args.batch_size, args.snip_batches, args.model)
    return spec_d, (f"{args.trials} trials of {args.steps} steps, {args.model} on mnist5k, sparsity 0.9, global batch "
                    f"{args.batch_size}, SNIP batches {args.snip_batches or 'all'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--np", type=int, default=2)
    add_study_arguments(parser, snip_batches=0)
    args = parser.parse_args()
    spec_d, title = study_of(args)
    spec = StudySpec.from_dict(spec_d)
    inside, launched = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            spec_path = Path(tmp) / "spec.json"
            spec_path.write_text(json.dumps(spec_d))
            inside.append(one_job(args.np, spec_path, Path(tmp) / "study"))
            launched.append(one_launch_per_trial(args.np, spec, Path(tmp) / "single"))
    a, b = statistics.median(inside), statistics.median(launched)
    print(f"{title}, np={args.np}, {os.cpu_count()} cores, median of {args.repeats}")
    print(f"{'scheme':<28} {'wall s':>8} {'s/trial':>8} {'trials/hour':>12}")
    for name, t in (("one horovodrun per trial", b), ("all trials in one job", a)):
        print(f"{name:<28} {t:8.1f} {t / args.trials:8.1f} {3600 * args.trials / t:12.0f}")
    print(f"ratio (trials/hour, one job vs per-trial launches): {b / a:.2f}x")


if __name__ == "__main__":
    main()
