"""How to fuse trials: torch.func's vmap against hand-fused layers, beside the same models one by one.

    python benchmarks/fuse_ops.py [--trials 16] [--batch-sizes 4 16 64 256] [--repeats 5] [--device cuda]

Simple-CNN, one intra-op thread (on the CPU), T models each with its own batch: ms of one forward and backward
pass of all T models (a training step without its optimizer), three ways side by side:
- ``loop``: each model alone, one after the other (unfused trials);
- ``vmap``: ``hvd_sparse.fused.losses``, the engine's way (torch.func.vmap over stacked parameters);
- ``hand``: Simple-CNN written fused by hand, as HFTA does: each convolution one grouped
  convolution (``groups=T``), the linear layer one ``baddbmm``.
Then the evaluation of T models on the same 1,000 examples: ``hvd_sparse.fused.evaluate`` (vmap)
against each model through the engine's channels-last twin (``Evaluator``). Medians of the repeats.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from hvd_sparse import fused
from hvd_sparse.models import build_model


def median_ms(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    def timed() -> float:
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed()  # warm-up
    return statistics.median(timed() for _ in range(repeats)) * 1000


def loop(models, x, y) -> None:
    for t, model in enumerate(models):
        F.cross_entropy(model(x[t]), y[t]).backward()


def vmap(models, x, y) -> None:
    fused.losses(models, x, y).sum().backward()


def hand(models, x, y) -> None:
    """Simple-CNN, T at a time, by hand: grouped convolutions and a batched matmul."""
    t, b = x.shape[:2]
    w = fused.stacked(models)
    h = x.transpose(0, 1).reshape(b, t * x.shape[2], *x.shape[3:])
    for conv in ("conv1", "conv2"):
        weight = w[f"{conv}.weight"]
        h = F.conv2d(h, weight.reshape(-1, *weight.shape[2:]), w[f"{conv}.bias"].reshape(-1), groups=t)
        h = F.max_pool2d(F.relu(h), 2)
    h = h.reshape(b, t, -1).transpose(0, 1)
    logits = torch.baddbmm(w["fc.bias"].unsqueeze(1), h, w["fc.weight"].transpose(1, 2))
    F.cross_entropy(logits.reshape(t * b, -1), y.reshape(-1), reduction="none").reshape(t, b).mean(1).sum().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16, 64, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    models = [build_model("simple-cnn", (1, 28, 28), 10, seed=t).to(device) for t in range(args.trials)]

    print(f"Simple-CNN, {args.trials} models on {device} (one thread): ms of forward + backward of all of them "
          f"(median of {args.repeats})")
    print(f"{'batch':>6} {'loop':>9} {'vmap':>9} {'hand':>9} {'vmap/hand':>10} {'loop/vmap':>10}")
    for batch in args.batch_sizes:
        x = torch.randn(args.trials, batch, 1, 28, 28, generator=g).to(device)
        y = torch.randint(0, 10, (args.trials, batch), generator=g).to(device)
        ms = {name: median_ms(lambda fn=fn: fn(models, x, y), args.repeats, device)
              for name, fn in (("loop", loop), ("vmap", vmap), ("hand", hand))}
        print(f"{batch:>6} {ms['loop']:9.1f} {ms['vmap']:9.1f} {ms['hand']:9.1f} {ms['vmap'] / ms['hand']:10.2f} "
              f"{ms['loop'] / ms['vmap']:10.2f}", flush=True)

    from hvd_sparse.data import Split
    from hvd_sparse.config import Config
    from hvd_sparse.engine import Evaluator

    x = torch.randn(1000, 1, 28, 28, generator=g).to(device)
    y = torch.randint(0, 10, (1000,), generator=g).to(device)
    evaluators = [Evaluator(m, device, Config()) for m in models]
    alone = median_ms(lambda: [e(Split(x, y), 1000) for e in evaluators], args.repeats, device)
    together = median_ms(lambda: fused.evaluate(models, x, y, 1000), args.repeats, device)
    print(f"evaluation of {args.trials} models on 1,000 examples: one by one (on the CPU, channels-last twins) {alone:.0f} ms, "
          f"fused (vmap) {together:.0f} ms: fused/alone {together / alone:.2f}")


if __name__ == "__main__":
    main()
