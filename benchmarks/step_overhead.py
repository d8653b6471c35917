"""ms per training step: hvd_sparse vs a bare Horovod loop, DDP + torch.nn.utils.prune, and compute only.

    python benchmarks/step_overhead.py [--batch-size 64] [--repeats 2]

All at np=2 on this machine (compute only: one process at half the batch, no communication, the
limit no data-parallel loop can beat), Simple-CNN on the bundled digits, 90% sparsity for the
pruned loops, Nesterov, the same torch threads per rank. hvd_sparse runs through its real CLI
(horovodrun ... -m hvd_sparse.train): the figure is the wall time between its logged evaluations at
steps 200 and 400 over 200, so it includes everything a user's run pays per step (masking, the
stop-signal check every 10 steps, the evaluation at step 400 of the 500 validation digits). The peers
(benchmarks/peers.py) time 200 steps after 20 of warm-up. Variants are interleaved, each repeat runs
them all once, and the median is printed with the ratios the goals are stated in. The bare loop runs
twice: as Horovod's example is (Horovod's and Open MPI's defaults), and with the launch defaults
hvd_sparse's dist.init() sets (dist.LAUNCH_DEFAULTS), so the toolkit's own cost shows apart.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from hvd_sparse.dist import LAUNCH_DEFAULTS
from hvd_sparse.log import read_log

BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def hvd_sparse_ms(batch: int, compression: str, env: dict[str, str] | None = None, model: str = "simple-cnn",
                  dataset: str = "mnist5k", steps: int = 400) -> float:
    """ms per step of ``horovodrun -np 2 python -m hvd_sparse.train``: logged wall time between the
    evaluations at steps/2 and steps."""
    half = steps // 2
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([str(BIN / "horovodrun"), "-np", "2", sys.executable, "-m", "hvd_sparse.train",
                        "--dataset", dataset, "--model", model, "--sparsity", "0.9", "--optimizer", "nesterov",
                        "--lr", "0.01", "--momentum", "0.9", "--batch-size", str(batch), "--max-steps", str(steps),
                        "--eval-every", str(half), "--goal-error", "0", "--snip-batches", "1", "--grad-compression",
                        compression, "--no-progress", "--log-level", "warning", "--out", out],
                       check=True, env=env or ENV, capture_output=True, text=True)
        (log,) = Path(out).glob("*.h5")
        m = read_log(log, with_mask=False).measurements
        at = m["step"].tolist()
        return float(m["wall_time"][at.index(steps)] - m["wall_time"][at.index(half)]) / half * 1000


def peer_ms(mode: str, batch: int, env: dict[str, str] | None = None) -> float:
    args = [str(HERE / "peers.py"), mode, "220", str(batch)]
    if mode == "horovod":
        cmd = [str(BIN / "horovodrun"), "-np", "2", sys.executable, *args]
    elif mode == "ddp-prune":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531", *args]
    else:
        cmd = [sys.executable, *args]
    proc = subprocess.run(cmd, check=True, env=env or ENV, capture_output=True, text=True)
    (value,) = re.findall(r"ms_per_step ([0-9.]+\d)", proc.stdout)  # launchers may glue other ranks' tags on
    return float(value)


VARIANTS = {
    "hvd_sparse, mask (packed)": lambda b: hvd_sparse_ms(b, "mask"),
    "hvd_sparse, none (dense)": lambda b: hvd_sparse_ms(b, "none"),
    "bare Horovod loop": lambda b: peer_ms("horovod", b),
    "bare loop + launch defaults": lambda b: peer_ms("horovod", b, {**ENV, **LAUNCH_DEFAULTS}),
    "DDP (gloo) + prune": lambda b: peer_ms("ddp-prune", b),
    "compute only (np=1, B/2)": lambda b: peer_ms("compute", b),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, run in VARIANTS.items():
            times[name].append(run(args.batch_size))
    med = {name: statistics.median(t) for name, t in times.items()}
    bare, ddp, compute = med["bare Horovod loop"], med["DDP (gloo) + prune"], med["compute only (np=1, B/2)"]
    print(f"ms per step, np=2, global batch {args.batch_size}, Simple-CNN mnist5k, median of {args.repeats} "
          f"interleaved runs ({os.cpu_count()} cores)")
    print(f"{'loop':<28} {'ms/step':>8} {'runs':>16} {'/bare hvd':>10} {'/DDP+prune':>11} {'/compute':>9}")
    for name, value in med.items():
        runs = ",".join(f"{t:.1f}" for t in times[name])
        print(f"{name:<28} {value:8.1f} {runs:>16} {value / bare:10.2f} {value / ddp:11.2f} {value / compute:9.2f}")


if __name__ == "__main__":
    main()
