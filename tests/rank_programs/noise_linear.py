"""Run under horovodrun (or alone): the trainer's noise-scale measurement on linear regression, where
B_simple is known in closed form.

Model w (d entries) at w* + delta, data x ~ N(0, I_d), y = x.w* + sigma * eps, loss 0.5 (x.w - y)^2.
Per-example gradient g = (x.delta - sigma eps) x, so G = delta and
    tr(Sigma) over the kept entries K = sum_{j in K} (|delta|^2 + sigma^2 + delta_j^2)
    |G_K|^2 = sum_{j in K} delta_j^2
argv: OUT_JSON SCHEME MASKED STEPS; every rank draws its own examples for every step. Rank 0 writes
the smoothed estimates and the closed-form values to OUT_JSON.
"""
import json
import sys

import torch
from torch import nn

from hvd_sparse import dist, gradsync
from hvd_sparse.config import Config
from hvd_sparse.mask import Mask
from hvd_sparse.measure import Trial, average_contributions
from hvd_sparse.noise import NoiseScaleMeasurement, local_gradients

out, scheme, masked, steps = sys.argv[1], sys.argv[2], sys.argv[3] == "masked", int(sys.argv[4])
D, SIGMA, BATCH = 10, 1.0, 64
dist.init()
world, rank = dist.size(), dist.rank()
setup = torch.Generator().manual_seed(0)
w_star, delta = torch.randn(D, generator=setup), torch.randn(D, generator=setup)
delta /= delta.norm()
model = nn.Linear(D, 1, bias=False)
with torch.no_grad():
    model.weight.copy_((w_star + delta)[None])
keep = torch.arange(D) % 2 == 0 if masked else torch.ones(D, dtype=torch.bool)
mask = Mask({"weight": keep[None].clone()})
sync = gradsync.gradient_sync(scheme, [(torch.optim.SGD(model.parameters(), lr=0.0), model, mask)])
masks = mask.by_parameter(model)
cfg = Config.from_dict({"train": {"batch_size": BATCH, "noise_scale_every": 1, "noise_scale_smoothing": 0.999}})
measure = NoiseScaleMeasurement(Trial(cfg, model, mask, None, None, rank, world, lambda t: t))
noise = measure.noise  # what the engine's measurement holds


def loss_fn(x, y):
    return 0.5 * (model(x).squeeze(1) - y).square().mean()


local = BATCH // world
for step in range(steps):
    draw = torch.Generator().manual_seed(1_000_000 + step * world + rank)
    x = torch.randn(local, D, generator=draw)
    y = x @ w_star + SIGMA * torch.randn(local, generator=draw)
    sync.zero_grad()
    _, local_sq = local_gradients([model], lambda part: [loss_fn(x[part], y[part])], len(y), [masks], halves=world == 1)
    sync.synchronize()
    average_contributions([(measure, measure.after_average(float(local_sq[0])))],
                          lambda t: dist.allreduce_mean(t, name="noise.local_sq"))

if rank == 0:
    kept = delta[keep]
    trace = float(keep.sum() * (delta.square().sum() + SIGMA**2) + kept.square().sum())
    g2 = float(kept.square().sum())
    with open(out, "w") as f:
        json.dump({"b_simple": noise.b_simple, "grad_sq": noise.grad_sq, "grad_trace": noise.grad_trace,
                   "exact": {"b_simple": trace / g2, "grad_sq": g2, "grad_trace": trace}}, f)
