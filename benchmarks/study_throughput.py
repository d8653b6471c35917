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
import statistics
import tempfile
from pathlib import Path

from common import CORES, add_study_arguments, spec_file, study_of, study_seconds, timed

from hvd_sparse.study import StudySpec, grid


def one_launch_per_trial(np_: int, spec: StudySpec, out: Path) -> float:
    total = 0.0
    for trial in grid(spec):
        c = trial.config
        flags = [
            "--dataset", c.data.dataset, "--model", c.model.model, "--sparsity", str(c.prune.sparsity),
            "--optimizer", c.optim.optimizer, "--lr", repr(c.optim.lr), "--momentum", repr(c.optim.momentum),
            "--batch-size", str(c.train.batch_size), "--max-steps", str(c.train.max_steps),
            "--eval-every", str(c.train.eval_every), "--goal-error", str(c.train.goal_error),
            "--seed", str(c.train.seed), "--snip-batches", str(c.prune.snip_batches), "--no-progress",
            "--log-level", "warning", "--out", str(out),
        ]
        total += timed(np_, ["-m", "hvd_sparse.train", *flags])
    return total


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
            inside.append(study_seconds(args.np, spec_file(spec_d, Path(tmp)), Path(tmp) / "study"))
            launched.append(one_launch_per_trial(args.np, spec, Path(tmp) / "single"))
    a, b = statistics.median(inside), statistics.median(launched)
    print(f"{title}, np={args.np}, {CORES} cores, median of {args.repeats}")
    print(f"{'scheme':<28} {'wall s':>8} {'s/trial':>8} {'trials/hour':>12}")
    for name, t in (("one horovodrun per trial", b), ("all trials in one job", a)):
        print(f"{name:<28} {t:8.1f} {t / args.trials:8.1f} {3600 * args.trials / t:12.0f}")
    print(f"ratio (trials/hour, one job vs per-trial launches): {b / a:.2f}x")


if __name__ == "__main__":
    main()
