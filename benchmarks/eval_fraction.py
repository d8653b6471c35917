"""Share of a trial's wall time spent evaluating the whole validation split, at the mini study's interval.

    python benchmarks/eval_fraction.py [--batch-sizes 16 64 256] [--repeats 2]

For each global batch size, the mini study's trial (Simple-CNN, mnist5k, 500 validation digits,
sparsity 0.9, np=2) runs 100 steps twice, interleaved: evaluating every 5 steps (the study's interval:
20 evaluations) and every 100 (1 evaluation). From the logged wall times between steps 0 and 100,
the evaluation share of the every-5 run is (T5 - T100) x 20/19 / T5. Median of the repeats.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from hvd_sparse.log import read_log

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def window(batch: int, eval_every: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([str(BIN / "horovodrun"), "-np", "2", sys.executable, "-m", "hvd_sparse.train",
                        "--dataset", "mnist5k", "--model", "simple-cnn", "--sparsity", "0.9", "--optimizer", "nesterov",
                        "--lr", "0.01", "--batch-size", str(batch), "--max-steps", "100", "--eval-every", str(eval_every),
                        "--goal-error", "0", "--snip-batches", "1", "--no-progress", "--log-level", "warning",
                        "--out", out], check=True, env=ENV, capture_output=True, text=True)
        (log,) = Path(out).glob("*.h5")
        m = read_log(log, with_mask=False).measurements
        return float(m["wall_time"][-1] - m["wall_time"][0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"evaluation share of wall time at --eval-every 5 (mini study), np=2, median of {args.repeats}")
    print(f"{'batch':>6} {'every 5 (s)':>12} {'every 100 (s)':>14} {'eval share':>11}")
    for batch in args.batch_sizes:
        t5, t100 = [], []
        for _ in range(args.repeats):
            t5.append(window(batch, 5))
            t100.append(window(batch, 100))
        a, b = statistics.median(t5), statistics.median(t100)
        print(f"{batch:>6} {a:12.2f} {b:14.2f} {(a - b) * 20 / 19 / a:10.0%}", flush=True)


if __name__ == "__main__":
    main()
