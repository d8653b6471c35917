"""One training step of Simple-CNN in each memory layout and precision, side by side, one thread.

    python benchmarks/step_speed.py [--batch-sizes 8 64 512] [--repeats 5] [--threads 1] [--compile]

A step is what the engine does on one rank: forward, cross-entropy, backward, the Nesterov update and
the mask applied to the weights (sparsity 0.9, a random mask). Variants:
  fp32                       today's training: NCHW (contiguous) tensors, float32
  input channels-last        the batch handed to the model in channels-last; weights as they are
  channels-last              the model's parameters and the batch in channels-last (``--memory-format
                             channels-last``)
  channels-last per call     the batch, and a channels-last copy of each convolution weight made in every
                             forward (the parameters, their gradients and optimizer state stay as they are)
  bf16                       autocast to bfloat16 (weights and gradients stay float32; ``--precision bf16``)
  bf16 + channels-last, bf16 + channels-last per call
and the evaluation pass (6,000 images, batch 1,000, no gradient) in fp32, channels-last and bf16, and at
other evaluation batch sizes. Each
variant is timed in turn inside every repeat (so a busy machine slows them all alike), after warm-up;
the medians are printed with their ratio to fp32 (above 1: faster). The CPU's name and flags are printed
first: the ratios depend on them (bf16 is fast only with AVX-512 BF16 or AMX).
"""
from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from hvd_sparse.models import build_model

VARIANTS = {  # name: (weights channels-last: "model" (the parameters) or "call" (a copy per forward, as the
    # engine does); input channels-last; autocast bf16)
    "fp32": (None, False, False),
    "input channels-last": (None, True, False),
    "channels-last": ("model", True, False),
    "channels-last per call": ("call", True, False),
    "bf16": (None, False, True),
    "bf16 + channels-last": ("model", True, True),
    "bf16 + channels-last per call": ("call", True, True),
}
COMPILED = "torch.compile"  # with --compile: the fp32 step through torch.compile(model) (compiled during warm-up)
EVAL_VARIANTS = {"fp32": (False, False), "channels-last": (True, False), "bf16 + channels-last": (True, True)}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        name = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags"))
        extra = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
        return f"{name} ({', '.join(extra)})"
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def step_fn(batch: int, weights_cl: str | None, input_cl: bool, bf16: bool, compiled: bool = False) -> Callable[[], None]:
    model = build_model("simple-cnn", (1, 28, 28), 10, seed=0)
    masks = [torch.rand(p.shape, generator=torch.Generator().manual_seed(i)) > 0.9 for i, p in enumerate(model.parameters())]
    forward = torch.compile(model) if compiled else model
    if weights_cl == "call":
        forward = lambda x: torch.func.functional_call(model, {  # noqa: E731
            n: p.contiguous(memory_format=torch.channels_last) if p.dim() == 4 else p for n, p in model.named_parameters()}, (x,))
    if weights_cl == "model":
        model = model.to(memory_format=torch.channels_last)
        masks = [m.contiguous(memory_format=torch.channels_last) if m.dim() == 4 else m for m in masks]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(batch, 1, 28, 28, generator=g), torch.randint(0, 10, (batch,), generator=g)

    def step() -> None:
        xb = x.contiguous(memory_format=torch.channels_last) if input_cl else x
        opt.zero_grad(set_to_none=False)
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = F.cross_entropy(forward(xb), y)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for p, m in zip(model.parameters(), masks):
                p.mul_(m)
    return step


def eval_fn(model_cl: bool, bf16: bool, batch: int = 1000) -> Callable[[], None]:
    model = build_model("simple-cnn", (1, 28, 28), 10, seed=0).eval()
    x = torch.rand(6000, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    if model_cl:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def evaluate() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            for start in range(0, len(x), batch):
                model(x[start:start + batch]).float().argmax(1)
    return evaluate


def timed(fn: Callable[[], None], seconds: float) -> float:
    """Seconds per call, over at least ``seconds`` of calls."""
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def compare(fns: dict[str, Callable[[], None]], repeats: int, seconds: float) -> dict[str, float]:
    for fn in fns.values():
        timed(fn, seconds / 2)  # warm-up: oneDNN primitives, allocator
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(timed(fn, seconds))
    return {name: statistics.median(s) for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 64, 512])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="timing window of one sample")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="also time the fp32 step through torch.compile")
    parser.add_argument("--eval-batch-sizes", type=int, nargs="+", default=[250, 1000, 3000],
                        help="evaluation batch sizes compared (channels-last, fp32) against the default 1,000")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{cpu_name()}; torch {torch.__version__}; {args.threads} thread(s); median of {args.repeats}")
    names = list(VARIANTS) + ([COMPILED] if args.compile else [])
    print(f"{'batch':>6} " + " ".join(f"{name:>30}" for name in names))
    for batch in args.batch_sizes:
        fns = {name: step_fn(batch, *v) for name, v in VARIANTS.items()}
        if args.compile:
            fns[COMPILED] = step_fn(batch, None, False, False, compiled=True)
        t = compare(fns, args.repeats, args.seconds)
        cells = [f"{t['fp32'] * 1e3:.2f} ms"] + [f"{t['fp32'] / t[name]:.2f}x" for name in names[1:]]
        print(f"{batch:>6} " + " ".join(f"{c:>30}" for c in cells))
    t = compare({name: eval_fn(*v) for name, v in EVAL_VARIANTS.items()}, args.repeats, args.seconds)
    print("evaluation of 6,000 images: " + ", ".join(
        [f"fp32 {t['fp32'] * 1e3:.0f} ms"] + [f"{name} {t['fp32'] / t[name]:.2f}x" for name in list(EVAL_VARIANTS)[1:]]))
    t = compare({b: eval_fn(True, False, b) for b in args.eval_batch_sizes}, args.repeats, args.seconds)
    base = t.get(1000, next(iter(t.values())))
    print("evaluation batch size (channels-last, fp32), against 1,000: " + ", ".join(
        f"{b}: {t[b] * 1e3:.0f} ms ({base / t[b]:.2f}x)" for b in t))


if __name__ == "__main__":
    main()
