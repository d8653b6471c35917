"""A rerun of some study cells against the committed results of the same cells: answers and cost.

    python benchmarks/compare_studies.py RUN_DIR [--reference docs/fashion-study]
    python benchmarks/compare_studies.py docs/fashion-study/capped/trials.csv     # the committed rerun's table

RUN_DIR is a folder of trial logs (a study directory), or the aggregator's trials.csv of one; the reference is a folder holding the
aggregator's ``trials.csv`` of the original run. For every cell of the rerun (optimizer, sparsity,
batch size) it prints the steps-to-result and best trial of both, and what the cells cost: the sum of
the trials' wall times (core-hours, one core per trial as ``--pack`` runs them) and of the steps they
trained (which no other load on the machine changes). Cells are matched by their workload and grid
coordinates; the trials too, by their log paths and learning rates (the reference table has no run
hashes), so a rerun with another precision or layout, whose trials differ only in those, still counts
as "the same trials": that is what it compares.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

from hvd_sparse.aggregate import STUDY, read_trials, study_table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--reference", default="docs/fashion-study", help="folder of the original trials.csv")
    args = parser.parse_args()
    rerun = pd.read_csv(args.run_dir) if args.run_dir.endswith(".csv") else read_trials(args.run_dir)[0]
    reference = pd.read_csv(Path(args.reference) / "trials.csv")
    keys = rerun[STUDY].drop_duplicates()
    reference = reference.merge(keys, on=STUDY)
    ours, theirs = study_table(rerun), study_table(reference)
    both = ours.merge(theirs, on=STUDY, suffixes=("", "_ref"))
    fmt = lambda v: "-" if not math.isfinite(v) else f"{v:.0f}"  # noqa: E731
    print(f"{'optimizer':<9} {'sparsity':>8} {'batch':>6} {'steps':>7} {'(ref)':>7} {'best':>5} {'(ref)':>6} "
          f"{'complete':>8} {'capped':>6} {'same':>5}")
    same_answers = 0
    for r in both.itertuples():
        same = r.steps_to_result == r.steps_to_result_ref and r.best_trial == r.best_trial_ref or (
            math.isnan(r.steps_to_result) and math.isnan(r.steps_to_result_ref))
        same_answers += bool(same)
        print(f"{r.optimizer:<9} {r.sparsity:>8g} {r.batch_size:>6} {fmt(r.steps_to_result):>7} "
              f"{fmt(r.steps_to_result_ref):>7} {r.best_trial:>5} {r.best_trial_ref:>6} {r.complete:>4}/{r.trials:<3} "
              f"{r.capped:>6} {'yes' if same else 'NO':>5}")
    trials = lambda t: set(zip(t.path.map(lambda p: Path(p).parts[-4:]), t.lr.map(lambda v: f"{v:.5g}")))  # noqa: E731
    hashes = trials(rerun) == trials(reference)
    hours, ref_hours = rerun.wall_time.sum() / 3600, reference.wall_time.sum() / 3600
    steps, ref_steps = rerun.steps_done.sum(), reference.steps_done.sum()
    print(f"{same_answers} of {len(both)} cells with the same steps-to-result and best trial; "
          f"trials {'the same' if hashes else 'NOT the same'} (paths and learning rates)")
    print(f"cost: {hours:.2f} core-hours against {ref_hours:.2f} ({ref_hours / hours:.2f}x); "
          f"{steps:,} steps trained against {ref_steps:,} ({ref_steps / steps:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
