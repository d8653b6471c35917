"""What one evaluation of the mini study costs, part by part (one process, one thread, as a rank at np=2).

    python benchmarks/eval_profile.py [--repeats 20]

Simple-CNN, the 250 validation digits one of two ranks evaluates, and the writes rank 0 makes after
each evaluation: the log append (in-memory HDF5 image, write, fsync, rename) and the checkpoint. The
forward pass both on the model as it trains (contiguous) and on the channels-last twin the trainer
evaluates through on the CPU (engine.Evaluator), with whether their predictions are equal.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import mean_ms

from hvd_sparse.checkpoint import Progress, save_checkpoint
from hvd_sparse.config import DataConfig
from hvd_sparse.data import load_datasets
from hvd_sparse.log import TrialLog
from hvd_sparse.mask import Mask
from hvd_sparse.models import build_model, prunable_names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_datasets(DataConfig(dataset="mnist5k"))
    model = build_model("simple-cnn", data.input_shape, data.num_classes, seed=0).eval()
    x = data.val.x[:250]
    twin = build_model("simple-cnn", data.input_shape, data.num_classes, seed=0).eval()
    twin = twin.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        forward = mean_ms(lambda: model(x), args.repeats)
        channels_last = mean_ms(lambda: twin(x.contiguous(memory_format=torch.channels_last)), args.repeats)
        same = bool(torch.equal(model(x).argmax(1), twin(x.contiguous(memory_format=torch.channels_last)).argmax(1)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        path = Path(tmp) / "t.h5"
        log = TrialLog.create(path, {"config": "{}", "run_hash": "x"}, Mask.ones(model, prunable_names(model, True)))
        row = {"step": 0, "val_error": 0.5, "val_loss": 1.0, "train_loss": 1.0, "wall_time": 0.0, "allreduce_bytes": 0}
        append = mean_ms(lambda: log.append(row), args.repeats)
        checkpoint = mean_ms(lambda: save_checkpoint(path, Progress(1), model, optimizer, "x", "y"), args.repeats)
        sizes = path.stat().st_size, path.with_suffix(".ckpt.pt").stat().st_size
    print(f"one evaluation, Simple-CNN, 250 digits, 1 thread, mean of {args.repeats}")
    print(f"{'forward, contiguous (inference_mode)':<36} {forward:8.1f} ms")
    print(f"{'forward, channels-last twin (used)':<36} {channels_last:8.1f} ms  ({forward / channels_last:.2f}x, "
          f"same predictions: {same})")
    print(f"{'log append (log of {:,} bytes)'.format(sizes[0]):<36} {append:8.1f} ms")
    print(f"{'checkpoint ({:,} bytes)'.format(sizes[1]):<36} {checkpoint:8.1f} ms")


if __name__ == "__main__":
    main()
