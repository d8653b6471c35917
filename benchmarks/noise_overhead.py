"""Step cost of measuring the gradient noise scale: --noise-scale-every 0 (off) vs 10 vs 1, side by side.

    python benchmarks/noise_overhead.py [--np 2] [--batch-size 64] [--repeats 3]

Each run is the real CLI under horovodrun (Simple-CNN on mnist5k, sparsity 0.9, Nesterov); the figure
is the wall time between the evaluations at steps 100 and 300, read back from the HDF5 log (200 steps
and one evaluation; start-up and SNIP excluded). Settings are interleaved (off, 10, 1, off, 10, 1, ...)
so that drifts of this shared machine hit them alike; the median of the repeats is printed with the
ratio to "off".
"""
from __future__ import annotations

import argparse

from common import CORES, interleaved, medians, train_window

SETTINGS = (0, 10, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--np", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"ms per step, np={args.np}, global batch {args.batch_size}, Simple-CNN mnist5k sparsity 0.9, "
          f"median of {args.repeats} interleaved runs, {CORES} cores")
    print(f"{'compression':<12} " + " ".join(f"{'every ' + str(e) if e else 'off':>10}" for e in SETTINGS)
          + " " + " ".join(f"{'ratio ' + str(e):>9}" for e in SETTINGS[1:]))
    for compression in ("none", "kept"):
        med = medians(interleaved({
            every: (lambda every=every: train_window(args.np, 100, 300, batch_size=args.batch_size,
                                                     noise_scale_every=every, grad_compression=compression) / 200 * 1000)
            for every in SETTINGS
        }, args.repeats))
        print(f"{compression:<12} " + " ".join(f"{med[e]:10.1f}" for e in SETTINGS) + " "
              + " ".join(f"{med[e] / med[0]:9.2f}" for e in SETTINGS[1:]), flush=True)


if __name__ == "__main__":
    main()
