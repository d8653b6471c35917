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
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from hvd_sparse.log import read_log

SETTINGS = (0, 10, 1)


def seconds_per_200(np_: int, batch: int, every: int, compression: str, out: Path) -> float:
    cmd = [
        str(Path(sys.executable).parent / "horovodrun"), "-np", str(np_), sys.executable, "-m", "hvd_sparse.train",
        "--dataset", "mnist5k", "--model", "simple-cnn", "--sparsity", "0.9", "--optimizer", "nesterov",
        "--lr", "0.01", "--batch-size", str(batch), "--max-steps", "300", "--eval-every", "100", "--goal-error", "0",
        "--snip-batches", "1", "--noise-scale-every", str(every), "--grad-compression", compression,
        "--no-progress", "--log-level", "warning", "--out", str(out), "--overwrite",
    ]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    (log_file,) = out.glob("*.h5")
    m = read_log(log_file, with_mask=False).measurements
    at = m["step"].tolist()
    return float(m["wall_time"][at.index(300)] - m["wall_time"][at.index(100)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--np", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"ms per step, np={args.np}, global batch {args.batch_size}, Simple-CNN mnist5k sparsity 0.9, "
          f"median of {args.repeats} interleaved runs, {os.cpu_count()} cores")
    print(f"{'compression':<12} " + " ".join(f"{'every ' + str(e) if e else 'off':>10}" for e in SETTINGS)
          + " " + " ".join(f"{'ratio ' + str(e):>9}" for e in SETTINGS[1:]))
    for compression in ("none", "mask"):
        times: dict[int, list[float]] = {e: [] for e in SETTINGS}
        for _ in range(args.repeats):
            for every in SETTINGS:
                with tempfile.TemporaryDirectory() as tmp:
                    times[every].append(seconds_per_200(args.np, args.batch_size, every, compression, Path(tmp)) / 200)
        med = {e: statistics.median(t) * 1000 for e, t in times.items()}
        print(f"{compression:<12} " + " ".join(f"{med[e]:10.1f}" for e in SETTINGS) + " "
              + " ".join(f"{med[e] / med[0]:9.2f}" for e in SETTINGS[1:]), flush=True)


if __name__ == "__main__":
    main()
