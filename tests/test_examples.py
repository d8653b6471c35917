"""The plug-ins in examples/, run as a user runs them, through the CLIs: the BatchNorm network on data
read lazily trains at np=2 (Horovod, and torch.distributed) as at np=1, its study runs, and a
torchvision model trains by name."""
import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from hvd_sparse.log import read_log
from conftest import REPO, describe, horovodrun, launch_env, mpirun, run_train, torchrun

EXAMPLES = REPO / "examples"
pytestmark = pytest.mark.launches


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("npy-shards")
    proc = subprocess.run([sys.executable, str(EXAMPLES / "batchnorm_lazy.py"), str(folder)], env=launch_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, describe(proc)
    return folder


def trained(tmp_path, name, np_, shards, launcher=mpirun):
    flags = ["--plugin", str(EXAMPLES / "batchnorm_lazy.py"), "--model", "bn-cnn", "--dataset", "npy-shards",
             "--data-dir", str(shards), "--sparsity", "0.5", "--batch-size", "64", "--max-steps", "60",
             "--eval-every", "20", "--goal-error", "0", "--lr", "0.1"]
    proc = run_train(np_, *flags, "--out", str(tmp_path / name), launcher=launcher)
    assert proc.returncode == 0, describe(proc)
    (log,) = (tmp_path / name).glob("*.h5")
    return read_log(log)


def test_the_batchnorm_example_on_lazy_data_trains_at_np2_as_at_np1_on_both_engines(tmp_path, shards):
    """Each BatchNorm layer normalizes by the global batch's statistics: np=2 is np=1 up to float
    summation order (per-shard statistics would part at the first step: the losses differ by ~1e-2)."""
    one = trained(tmp_path, "np1", 1, shards)
    for name, launcher in (("horovod", mpirun), ("torch", torchrun)):
        two = trained(tmp_path, name, 2, shards, launcher)
        assert two.attrs["world_size"] == 2 and two.attrs["mask_sha256"] == one.attrs["mask_sha256"]
        for column in ("val_loss", "val_error"):
            np.testing.assert_allclose(two.measurements[column], one.measurements[column], rtol=2e-6, err_msg=f"{name} {column}")
        np.testing.assert_allclose(two.measurements["train_loss"][1:], one.measurements["train_loss"][1:], rtol=2e-6)
    (plugin,) = json.loads(one.attrs["plugins"])
    assert plugin["source"].endswith("examples/batchnorm_lazy.py") and len(plugin["sha256"]) == 64
    assert all(not name.startswith(("1.", "5.")) for name in one.mask)  # BatchNorm is never pruned


def test_the_example_study_runs_a_slice_through_the_cli(tmp_path, shards):
    spec = EXAMPLES / "batchnorm_lazy.yaml"
    proc = horovodrun(2, ["-m", "hvd_sparse.study", str(spec), "--data-dir", str(shards), "--out", str(tmp_path),
                          "--shard", "2/8"], timeout=240)
    assert proc.returncode == 0, describe(proc)
    (log,) = tmp_path.glob("example-batchnorm-lazy-*/npy-shards/bn-cnn/nesterov/sparsity-0/batch-64/trial-000.h5")
    with h5py.File(log, "r") as f:
        assert f.attrs["status"] == "COMPLETE" and f.attrs["world_size"] == 2


def test_a_torchvision_model_trains_by_name_with_synchronized_batchnorm(tmp_path):
    proc = horovodrun(2, ["-m", "hvd_sparse.train", "--no-progress", "--plugin", str(EXAMPLES / "torchvision_models.py"),
                          "--model", "tv-resnet18", "--dataset", "synthetic-cifar", "--sparsity", "0.9",
                          "--batch-size", "32", "--max-steps", "2", "--eval-every", "2", "--snip-batches", "1",
                          "--out", str(tmp_path)], timeout=240)
    assert proc.returncode == 0, describe(proc)
    (log,) = tmp_path.glob("*.h5")
    trial = read_log(log)
    assert trial.attrs["status"] == "INCOMPLETE" and trial.measurements["step"][-1] == 2
    assert "net.bn1.weight" not in list(trial.mask) and "net.conv1.weight" in list(trial.mask)


TRAINING_MODE_SCORE = """
import torch
import hvd_sparse


@hvd_sparse.register_pruning("gradient")
def gradient(given):  # runs the model in training mode: its BatchNorm sees rank 0's batch alone
    x, y = given.train.batch(torch.arange(100))
    params = dict(given.model.named_parameters())
    grads = torch.autograd.grad(given.loss_fn(given.model(x), y), [params[n] for n in given.names])
    return {n: g.abs() for n, g in zip(given.names, grads)}
"""


def test_a_score_that_runs_batchnorm_in_training_mode_on_rank_0_alone_does_not_wait_for_the_others(tmp_path, shards):
    score = tmp_path / "score.py"
    score.write_text(TRAINING_MODE_SCORE)
    proc = run_train(2, "--plugin", str(EXAMPLES / "batchnorm_lazy.py"), "--plugin", str(score), "--model", "bn-cnn",
                     "--dataset", "npy-shards", "--data-dir", str(shards), "--prune-method", "gradient", "--sparsity", "0.5",
                     "--batch-size", "64", "--max-steps", "2", "--eval-every", "2", "--out", str(tmp_path / "o"), timeout=120)
    assert proc.returncode == 0, describe(proc)
