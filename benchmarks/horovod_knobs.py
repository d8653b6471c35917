"""ms per step of the bare Horovod loop (benchmarks/peers.py) under Horovod's timing knobs, np=2.

    python benchmarks/horovod_knobs.py [--batch-size 64] [--repeats 2]

Evidence for where Horovod loses to DDP on few cores: its background thread wakes every
HOROVOD_CYCLE_TIME ms to negotiate and launch the fused allreduces. Interleaved, median of repeats.
"""
from __future__ import annotations

import argparse
import statistics

from step_overhead import ENV, peer_ms

SETTINGS = {
    "default": {},
    "HOROVOD_CYCLE_TIME=0.1": {"HOROVOD_CYCLE_TIME": "0.1"},
    "HOROVOD_CYCLE_TIME=5": {"HOROVOD_CYCLE_TIME": "5"},
    "HOROVOD_FUSION_THRESHOLD=0": {"HOROVOD_FUSION_THRESHOLD": "0"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for _ in range(args.repeats):
        for name, extra in SETTINGS.items():
            times[name].append(peer_ms("horovod", args.batch_size, {**ENV, **extra}))
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"bare Horovod loop, ms per step, np=2, global batch {args.batch_size}, median of {args.repeats}")
    print(f"{'setting':<30} {'ms/step':>8} {'runs':>12} {'vs default':>11}")
    for name, value in med.items():
        runs = ",".join(f"{t:.1f}" for t in times[name])
        print(f"{name:<30} {value:8.1f} {runs:>12} {value / med['default']:10.2f}x")


if __name__ == "__main__":
    main()
