"""Seconds per 100 training steps for each workload, at np=1 and np=2, through the real CLI.

    python benchmarks/step_time.py [--batch-size 128] [--steps 200]

Each run is `horovodrun -np N python -m hvd_sparse.train ...` with --eval-every 100; the figure is
the wall time between the evaluations at steps 100 and 200 read back from the HDF5 log, so it
covers 100 steps plus one evaluation of the validation split, and excludes start-up and SNIP.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from hvd_sparse.log import read_log

WORKLOADS = [
    ("mnist5k", "simple-cnn"),
    ("mnist5k", "lenet5"),
    ("mnist5k", "lenet-300-100"),
    ("synthetic-cifar", "resnet8"),
]


def seconds_per_100(np_: int, dataset: str, model: str, batch: int, steps: int, out: Path) -> float:
    cmd = [
        str(Path(sys.executable).parent / "horovodrun"), "-np", str(np_), sys.executable, "-m", "hvd_sparse.train",
        "--dataset", dataset, "--model", model, "--sparsity", "0.9", "--optimizer", "momentum", "--lr", "0.01",
        "--batch-size", str(batch), "--max-steps", str(steps), "--eval-every", "100", "--goal-error", "0",
        "--snip-batches", "1", "--no-progress", "--log-level", "warning", "--out", str(out), "--overwrite",
    ]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    (log_file,) = out.glob("*.h5")
    m = read_log(log_file, with_mask=False).measurements
    steps_at = m["step"].tolist()
    return float(m["wall_time"][steps_at.index(200)] - m["wall_time"][steps_at.index(100)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    print(f"seconds per 100 steps, global batch {args.batch_size}, sparsity 0.9, {os.cpu_count()} cores")
    print(f"{'dataset':<16} {'model':<14} {'np=1':>7} {'np=2':>7} {'np=2/np=1':>10}")
    for dataset, model in WORKLOADS:
        times = []
        for np_ in (1, 2):
            with tempfile.TemporaryDirectory() as tmp:
                times.append(seconds_per_100(np_, dataset, model, args.batch_size, args.steps, Path(tmp)))
        print(f"{dataset:<16} {model:<14} {times[0]:7.2f} {times[1]:7.2f} {times[1] / times[0]:10.2f}", flush=True)


if __name__ == "__main__":
    main()
