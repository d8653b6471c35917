"""Run under horovodrun: every rank builds a *different* model, then gets rank 0's SNIP mask.

argv: OUT_DIR MODE, MODE in {agree, mismatch}. Each rank saves its mask to OUT_DIR/rank<R>.pt.
With ``mismatch`` rank 1 flips one mask bit after the broadcast, and the checksum check must stop
every rank with DistributedError (exit 3 here).
"""
import sys
from pathlib import Path

import torch

from hvd_sparse import dist
from hvd_sparse.config import Config, DataConfig, ModelConfig, PruneConfig
from hvd_sparse.data import load_datasets
from hvd_sparse.mask import Mask
from hvd_sparse.models import build_model
from hvd_sparse.engine import prepare_mask

out, mode = Path(sys.argv[1]), sys.argv[2]
dist.init()
cfg = Config(data=DataConfig(dataset="synthetic"), model=ModelConfig("simple-cnn"), prune=PruneConfig(sparsity=0.8))
data = load_datasets(cfg.data)
model = build_model("simple-cnn", data.input_shape, data.num_classes, seed=100 + dist.rank())
dist.broadcast_parameters(model)
mask = prepare_mask(cfg, model, data, known=None)
torch.save({n: t for n, t in mask.items()}, out / f"rank{dist.rank()}.pt")
if mode == "mismatch":
    tensors = {n: t.clone() for n, t in mask.items()}
    if dist.rank() == 1:
        tensors["fc.weight"].view(-1)[0] ^= True
    try:
        dist.verify_same_everywhere(Mask(tensors).sha256(), "mask checksum")
    except dist.DistributedError as e:
        sys.stdout.write(f"rank {dist.rank()}: {e}\n")  # one write: mpirun interleaves per chunk
        sys.stdout.flush()
        dist.exit_barrier()
        sys.exit(3)
