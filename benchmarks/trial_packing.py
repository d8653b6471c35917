"""Trials per hour at np=2 for trials too small to scale: packed (--pack 2) vs every trial on both ranks.

    python benchmarks/trial_packing.py [--trials 12] [--steps 200] [--batch-size 32] [--snip-batches 10] [--model simple-cnn] [--repeats 1]

The same study (study_throughput.py's: ``--model`` on mnist5k, sparsity 0.9, Nesterov, goal error 0 so every
trial runs its whole budget) three ways, each one whole command, launch included:

- ``horovodrun -np 2 ... study`` : each trial data-parallel over both ranks (one trial at a time);
- ``horovodrun -np 2 ... study --pack 2`` : two groups of one rank, two trials at a time;
- ``python -m hvd_sparse.study`` : one rank alone, with both cores' threads (the other way to not
  pay for communication).

Then the results: each trial's best validation error, packed vs the one-rank
study and vs np=2 (the same optimization up to float summation order; bitwise equality with one
thread per rank is tests/test_study.py::test_packed_trials_measure_exactly_what_one_rank_measures).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import CORES, add_study_arguments, medians, spec_file, study_of, study_seconds

from hvd_sparse.aggregate import read_trials

SCHEMES = {
    "np=2, each trial on both ranks": (2, ()),
    "np=2 --pack 2 (2 trials at a time)": (2, ("--pack", "2")),
    "np=1, one rank with 2 threads": (0, ()),
}


def results(out: Path) -> dict[str, float]:
    """trial log (relative path) -> best validation error (every trial runs its whole budget)."""
    table, _ = read_trials(out)
    return dict(zip(table["path"], table["best_val_error"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_arguments(parser, snip_batches=10)
    args = parser.parse_args()
    spec_d, title = study_of(args)
    runs: dict[str, list[float]] = {name: [] for name in SCHEMES}
    found = {}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            spec_path = spec_file(spec_d, Path(tmp))
            for i, (name, (np_, extra)) in enumerate(SCHEMES.items()):
                out = Path(tmp) / f"study{i}"
                runs[name].append(study_seconds(np_, spec_path, out, *extra))
                found[name] = results(out)
    seconds = medians(runs)
    base = seconds["np=2, each trial on both ranks"]
    print(f"{title}, {CORES} cores, median of {args.repeats}")
    print(f"{'scheme':<36} {'wall s':>7} {'trials/hour':>12} {'vs np=2':>8}")
    for name, t in seconds.items():
        print(f"{name:<36} {t:7.1f} {3600 * args.trials / t:12.0f} {base / t:7.2f}x")
    packed = found["np=2 --pack 2 (2 trials at a time)"]
    for name in ("np=1, one rank with 2 threads", "np=2, each trial on both ranks"):
        other = found[name]
        equal = sum(packed[k] == other[k] for k in packed)
        worst = max(abs(packed[k] - other[k]) for k in packed)
        print(f"best validation error, packed vs {name}: equal in {equal}/{len(packed)} trials, "
              f"largest difference {worst:.4f}")


if __name__ == "__main__":
    main()
