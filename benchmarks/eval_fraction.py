"""Share of a trial's wall time spent evaluating the whole validation split, at the mini study's interval.

    python benchmarks/eval_fraction.py [--batch-sizes 16 64 256] [--repeats 2]

For each global batch size, the mini study's trial (Simple-CNN, mnist5k, 500 validation digits,
sparsity 0.9, np=2) runs 100 steps twice, interleaved: evaluating every 5 steps (the study's interval:
20 evaluations) and every 100 (1 evaluation). From the logged wall times between steps 0 and 100,
the evaluation share of the every-5 run is (T5 - T100) x 20/19 / T5. Median of the repeats.
"""
from __future__ import annotations

import argparse

from common import interleaved, medians, train_window


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"evaluation share of wall time at --eval-every 5 (mini study), np=2, median of {args.repeats}")
    print(f"{'batch':>6} {'every 5 (s)':>12} {'every 100 (s)':>14} {'eval share':>11}")
    for batch in args.batch_sizes:
        med = medians(interleaved({
            every: (lambda every=every: train_window(2, 0, 100, batch_size=batch, eval_every=every))
            for every in (5, 100)
        }, args.repeats))
        a, b = med[5], med[100]
        print(f"{batch:>6} {a:12.2f} {b:14.2f} {(a - b) * 20 / 19 / a:10.0%}", flush=True)


if __name__ == "__main__":
    main()
