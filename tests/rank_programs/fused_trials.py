"""Train six trials of one cell through the engine, FUSE at a time (1: each alone), on every rank.

argv: OUT FUSE MODEL [GRAD_COMPRESSION [DIVERGE]]. Trial t: seed t, Nesterov with its own learning
rate and momentum, sparsity 0.9, batch 8, 20 steps, an evaluation every 5; ``DIVERGE`` gives that
trial a learning rate of 1e6, so it ends INFEASIBLE early and its slot is refilled. The final weights
go to OUT/trial-<t>.final.pt (the engine's --save-model) beside the logs; rank 0 writes
OUT/results.json: per trial its status, steps and mask checksum, in the order the trials ended.
"""
import json
import sys
from pathlib import Path

import torch

from hvd_sparse import dist
from hvd_sparse.config import Config
from hvd_sparse.engine import Engine, Job, TrialResult, load_data_everywhere, select_device

out, fuse, model = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
compression = sys.argv[4] if len(sys.argv) > 4 else "none"
diverge = int(sys.argv[5]) if len(sys.argv) > 5 else None
BATCH = 8  # at np=1 and np=2 small enough to run fused on a CPU (``fused.pays``)
dist.init()
torch.set_num_threads(1)


def config(t: int) -> Config:
    lr = 1e6 if t == diverge else 0.005 * (1 + t % 3)
    return Config.from_dict({
        "data": {"dataset": "mnist5k"}, "model": {"model": model}, "prune": {"sparsity": 0.9, "snip_batches": 2},
        "optim": {"optimizer": "nesterov", "lr": lr, "momentum": 0.9 + 0.005 * t},
        "dist": {"grad_compression": compression},
        "train": {"batch_size": BATCH, "max_steps": 20, "eval_every": 5, "goal_error": 0.0, "seed": t},
        "run": {"out": str(out), "save_model": True, "progress": False},
    })


jobs = iter([Job(config(t), out / f"trial-{t}.h5", {"trial_id": t}) for t in range(6)])
results: list[tuple[Job, TrialResult]] = []
data = load_data_everywhere(config(0), select_device())
Engine(data, fuse, lambda: next(jobs, None), lambda job, result: results.append((job, result))).run()
if dist.is_root():
    (out / "results.json").write_text(json.dumps([
        {"trial": job.path.stem, "status": r.status, "steps": r.steps_done, "mask": r.mask_sha256} for job, r in results]))
dist.finish()
dist.leave(0)  # as the commands end (cli.guarded): a torchrun rank skips the interpreter's teardown
