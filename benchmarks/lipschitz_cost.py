"""Cost of measuring the gradient's Lipschitz constant: seconds per measurement and per step, np=1 vs np=2.

    python benchmarks/lipschitz_cost.py [--every 50] [--repeats 2]

The benchmark trial (Simple-CNN on the bundled digits, 4,500 training images, sparsity 0.9, batch 64)
through the real CLI, with --lipschitz-every 0 and EVERY, interleaved; the figure is the wall time
between the logged evaluations at steps 100 and 300 (200 steps, 200/EVERY measurements). Every rank
runs one thread, so that np=1 and np=2 differ only in how many ranks share the work: a measurement
is ten full-gradient passes over the training split divided among the ranks, so its cost per rank
should halve from np=1 to np=2 (with np=1 given every core instead, the wall time is about the
same as np=2's: the same work on the same cores). "in steps" is its cost in training steps of the
same run, and the last column the step-time overhead at the reference's interval of 1,000 steps.
"""
from __future__ import annotations

import argparse

from common import CORES, ENV, interleaved, medians, train_window

START, END = 100, 300


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    count = END // args.every - START // args.every
    print(f"Lipschitz measurement cost, Simple-CNN mnist5k sparsity 0.9, batch {args.batch_size}, {count} measurements "
          f"in {END - START} steps, one thread per rank, median of {args.repeats} interleaved, {CORES} cores")
    print(f"{'ranks':>5} {'ms/step off':>12} {'ms/step on':>11} {'s/measurement':>14} {'in steps':>9} {'+% at every 1000':>17}")
    for np_ in (1, 2):
        med = medians(interleaved({
            every: (lambda every=every: train_window(np_, START, END, {**ENV, "OMP_NUM_THREADS": "1"},
                                                     batch_size=args.batch_size, lipschitz_every=every))
            for every in (0, args.every)
        }, args.repeats))
        step = med[0] / (END - START)
        per = (med[args.every] - med[0]) / count
        print(f"{np_:>5} {step * 1000:12.1f} {med[args.every] / (END - START) * 1000:11.1f} {per:14.2f} "
              f"{per / step:9.0f} {100 * per / (1000 * step):16.1f}%", flush=True)


if __name__ == "__main__":
    main()
