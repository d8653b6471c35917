"""The torch.distributed engine against the Horovod engine, side by side: ms per training step at np=2
(dense and kept-entries allreduce, two batch sizes), and the wall time of a packed study (np=2 --pack 2).

    python benchmarks/engines.py [--repeats 3]

Each step figure is the window between the logged evaluations at steps 100 and 200 of the benchmark
trial (Simple-CNN on mnist5k, sparsity 0.9; start-up and SNIP left out), the same run launched by
horovodrun and by torchrun, interleaved so the drifts of a shared machine hit both alike; medians of
the repeats. The study figure is the whole job, launch included.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import add_study_arguments, interleaved, medians, spec_file, study_of, study_seconds, train_window

ENGINES = ("horovod", "torch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 256])
    add_study_arguments(parser, snip_batches=1)
    parser.set_defaults(trials=4, steps=200, repeats=3)
    args = parser.parse_args()

    print(f"ms per step at np=2 (median of {args.repeats}), Simple-CNN on mnist5k, sparsity 0.9")
    print(f"{'batch':>6} {'allreduce':<10} {'horovod':>9} {'torch':>9} {'torch/horovod':>14}")
    for batch in args.batch_sizes:
        for scheme in ("none", "kept"):
            runs = {engine: (lambda engine=engine: train_window(2, 100, 200, engine=engine, batch_size=batch,
                                                                 grad_compression=scheme) * 10) for engine in ENGINES}
            ms = medians(interleaved(runs, args.repeats))
            print(f"{batch:>6} {scheme:<10} {ms['horovod']:9.1f} {ms['torch']:9.1f} {ms['torch'] / ms['horovod']:14.2f}",
                  flush=True)

    spec, title = study_of(args)
    with tempfile.TemporaryDirectory() as tmp:
        path = spec_file(spec, Path(tmp))
        count = iter(range(10 ** 6))
        runs = {engine: (lambda engine=engine: study_seconds(2, path, Path(tmp) / f"out{next(count)}", "--pack", "2",
                                                             engine=engine)) for engine in ENGINES}
        s = medians(interleaved(runs, args.repeats))
    print(f"\npacked study, np=2 --pack 2, {title}: seconds (median of {args.repeats})")
    print(f"{'horovod':>9} {'torch':>9} {'torch/horovod':>14}")
    print(f"{s['horovod']:9.1f} {s['torch']:9.1f} {s['torch'] / s['horovod']:14.2f}")


if __name__ == "__main__":
    main()
