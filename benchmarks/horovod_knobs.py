"""ms per step under Horovod's and Open MPI's timing knobs, np=2: the evidence behind dist.init()'s defaults.

    python benchmarks/horovod_knobs.py [--batch-size 64] [--repeats 2] [--settings NAME ...] [--loops NAME ...]

Loops: the bare Horovod example loop (benchmarks/peers.py, Simple-CNN: 12 tensors), and hvd_sparse's
CLI (step_overhead.py's figure) on Simple-CNN (dense and kept-entries allreduce) and on ResNet-8 (dense:
many more, smaller tensors, where tensor fusion matters most). Each setting is the environment of the
whole launch, over a baseline with every knob named here unset (``HVD_SPARSE_HOROVOD_DEFAULTS=0``
turns off the toolkit's own defaults, so that "Horovod's defaults" are really Horovod's).
Interleaved, median of repeats, ratios against Horovod's defaults in the same run.
(HOROVOD_CPU_OPERATIONS=gloo under an MPI launch segfaults with this build: not a setting here.)
"""
from __future__ import annotations

import argparse

from common import CORES, ENV, interleaved, medians, ms_per_step, peer_ms

from hvd_sparse.dist import LAUNCH_DEFAULTS

KNOBS = ("HOROVOD_CYCLE_TIME", "HOROVOD_FUSION_THRESHOLD", "OMPI_MCA_mpi_yield_when_idle")
SETTINGS: dict[str, dict[str, str]] = {
    "Horovod's defaults": {"HVD_SPARSE_HOROVOD_DEFAULTS": "0"},
    "HOROVOD_CYCLE_TIME=5": {"HVD_SPARSE_HOROVOD_DEFAULTS": "0", "HOROVOD_CYCLE_TIME": "5"},
    "HOROVOD_FUSION_THRESHOLD=0": {"HVD_SPARSE_HOROVOD_DEFAULTS": "0", "HOROVOD_FUSION_THRESHOLD": "0"},
    "mpi_yield_when_idle=1": {"HVD_SPARSE_HOROVOD_DEFAULTS": "0", "OMPI_MCA_mpi_yield_when_idle": "1"},
    "hvd_sparse defaults": dict(LAUNCH_DEFAULTS),  # what dist.init() sets, given to the bare loop as well
}
LOOPS = {
    "bare loop": lambda b, env: peer_ms("horovod", b, env),
    "cnn dense": lambda b, env: ms_per_step(env=env, batch_size=b, grad_compression="none"),
    "cnn kept": lambda b, env: ms_per_step(env=env, batch_size=b, grad_compression="kept"),
    "resnet8 dense": lambda b, env: ms_per_step(steps=100, env=env, batch_size=b, grad_compression="none",
                                                model="resnet8", dataset="synthetic-cifar"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--loops", nargs="+", default=list(LOOPS), choices=list(LOOPS))
    args = parser.parse_args()
    base = {k: v for k, v in ENV.items() if k not in KNOBS}
    med = medians(interleaved({
        (s, lp): (lambda s=s, lp=lp: LOOPS[lp](args.batch_size, {**base, **SETTINGS[s]}))
        for s in args.settings for lp in args.loops
    }, args.repeats))
    ref = "Horovod's defaults" if "Horovod's defaults" in args.settings else args.settings[0]
    print(f"ms per step (x {ref}), np=2, global batch {args.batch_size}, median of {args.repeats} interleaved, "
          f"{CORES} cores")
    print(f"{'setting':<28}" + "".join(f"{lp:>22}" for lp in args.loops))
    for s in args.settings:
        cells = [f"{med[s, lp]:7.1f} ({med[s, lp] / med[ref, lp]:4.2f}x)" for lp in args.loops]
        print(f"{s:<28}" + "".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
