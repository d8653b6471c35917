"""Trials per hour: a study with its trials fused (``--fuse T``) against the same study unfused.

    python benchmarks/fused_study.py [--np 2] [--pack 2] [--fuse 8] [--trials 16] [--batch-sizes 4 16 64 256] [--repeats 1]

The same 16-trial cell (Simple-CNN on mnist5k, sparsity 0.9, Nesterov, goal error 0, so every trial
runs its whole step budget; evaluation at the start and the end; SNIP over one batch of 100) at each
batch size, run as a whole ``hvd_sparse.study`` job by horovodrun, ``--pack`` groups of ranks (one
thread a rank), unfused and with ``--fuse T`` in each group, alternating ``--repeats`` times. Whole
jobs (launch, start-up, SNIP of every trial) on both sides; medians. The step budget falls with the
batch size so that every row costs about the same.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import spec_file, study_seconds

STEPS = {4: 400, 16: 200, 64: 60, 256: 20}


def spec(trials: int, batch: int, steps: int) -> dict:
    return {
        "name": f"fused-b{batch}", "dataset": "mnist5k", "model": "simple-cnn", "sparsities": [0.9],
        "optimizers": ["nesterov"], "batch_sizes": [batch], "trials": trials, "goal_error": 0.0,
        "max_steps": steps, "eval_every": steps,
        "search": {"lr": {"range": [0.005, 0.1], "scale": "log"}, "momentum": {"range": [0.9, 0.99], "scale": "reverse-log"}},
        "config": {"prune": {"snip_batches": 1}},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--np", type=int, default=2)
    parser.add_argument("--pack", type=int, default=2)
    parser.add_argument("--fuse", type=int, default=8)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16, 64, 256])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    print(f"{args.trials} trials of Simple-CNN on mnist5k (sparsity 0.9) per batch size, np={args.np} --pack {args.pack}: "
          f"unfused against --fuse {args.fuse}; trials per hour, whole jobs (median of {args.repeats})")
    print(f"{'batch':>6} {'steps':>6} {'unfused':>9} {'fused':>9} {'fused/unfused':>14}")
    for batch in args.batch_sizes:
        steps = STEPS.get(batch, 100)
        seconds: dict[str, list[float]] = {"unfused": [], "fused": []}
        with tempfile.TemporaryDirectory() as tmp:
            path = spec_file(spec(args.trials, batch, steps), Path(tmp))
            for r in range(args.repeats):
                for side, extra in (("unfused", []), ("fused", ["--fuse", str(args.fuse)])):
                    out = Path(tmp) / f"{side}-{r}"
                    seconds[side].append(study_seconds(args.np, path, out, "--pack", str(args.pack), *extra))
        per_hour = {side: args.trials * 3600 / statistics.median(s) for side, s in seconds.items()}
        print(f"{batch:>6} {steps:>6} {per_hour['unfused']:9.0f} {per_hour['fused']:9.0f} "
              f"{per_hour['fused'] / per_hour['unfused']:14.2f}", flush=True)


if __name__ == "__main__":
    main()
