"""Training in another precision (bf16 autocast) and memory layout (channels-last): the run hash, and with
real ranks: np=2 the same optimization as np=1, pruned weights exactly zero, resumes exact."""
import json

import numpy as np
import pytest
import torch

from hvd_sparse.config import Config
from hvd_sparse.log import read_log
from conftest import describe, run_train
from test_capping import by_trial, write_cap_spec
from test_study import run_study

# -- the run hash ---------------------------------------------------------------------------------


def demo_config(**train):
    return Config.from_dict({
        "data": {"dataset": "mnist5k"}, "model": {"model": "simple-cnn"}, "prune": {"sparsity": 0.9},
        "optim": {"optimizer": "nesterov", "lr": 0.05, "momentum": 0.9},
        "train": {"batch_size": 64, "max_steps": 3000, "eval_every": 100, "goal_error": 0.05, "seed": 0, **train},
    })


def test_fields_at_their_default_leave_every_hash_as_it_was():
    assert demo_config().run_hash() == "975ae24bc78fa1b9"  # make demo's log, since 0.1.0
    assert "precision" not in demo_config().identity()["train"] and "prune_method" not in demo_config().identity()["prune"]
    assert demo_config().run_hash() == Config.from_dict({**demo_config().to_dict(), "prune": {
        **demo_config().to_dict()["prune"], "prune_method": "snip"}}).run_hash()
    assert demo_config(precision="fp32", memory_format="contiguous").run_hash() == "975ae24bc78fa1b9"
    bf16, cl = demo_config(precision="bf16"), demo_config(memory_format="channels-last")
    assert bf16.identity()["train"]["precision"] == "bf16" and cl.identity()["train"]["memory_format"] == "channels-last"
    assert len({bf16.run_hash(), cl.run_hash(), demo_config(precision="bf16", memory_format="channels-last").run_hash(),
                "975ae24bc78fa1b9"}) == 4


@pytest.mark.parametrize("field, value", [("precision", "fp16"), ("memory_format", "nhwc")])
def test_unknown_precision_or_layout_is_refused(field, value):
    with pytest.raises(ValueError, match=f"--{field.replace('_', '-')} must be one of"):
        demo_config(**{field: value})


# -- real ranks -----------------------------------------------------------------------------------

FLAGS = ["--dataset", "synthetic", "--model", "simple-cnn", "--sparsity", "0.9", "--optimizer", "nesterov",
         "--lr", "0.05", "--momentum", "0.9", "--batch-size", "32", "--max-steps", "40", "--eval-every", "10",
         "--goal-error", "0", "--save-model", "--seed", "3"]


def trained(tmp_path, np_, *extra):
    out = tmp_path / f"np{np_}{'_'.join(extra)}"
    proc = run_train(np_, *FLAGS, *extra, "--out", str(out))
    assert proc.returncode == 0, describe(proc)
    (log,) = out.glob("*.h5")
    return read_log(log), torch.load(log.with_suffix(".final.pt"))


def assert_pruned_zero(log, params):
    for name, keep in log.mask.items():
        assert torch.count_nonzero(params[name][~keep]) == 0, name


@pytest.fixture(scope="module")
def np1_runs(tmp_path_factory):
    """One rank, one thread: the channels-last run and the plain one, each (log, final weights). At
    np=1 every gradient compression sends the same masked gradient (test_dist), so one run serves both."""
    tmp = tmp_path_factory.mktemp("np1")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        return trained(tmp, 1, "--memory-format", "channels-last"), trained(tmp, 1)


@pytest.mark.launches
@pytest.mark.parametrize("compression", ["none", "kept"])
def test_channels_last_at_np2_is_the_same_optimization_as_at_np1(np1_runs, tmp_path, monkeypatch, compression):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ((l1, p1), (plain, _)), (l2, p2) = np1_runs, trained(tmp_path, 2, "--memory-format", "channels-last",
                                                         "--grad-compression", compression)
    for name in p1:
        torch.testing.assert_close(p2[name], p1[name], rtol=1e-5, atol=1e-7, msg=name)
    assert l1.measurements["val_error"].tolist() == l2.measurements["val_error"].tolist()
    assert_pruned_zero(l2, p2)
    assert plain.attrs["mask_sha256"] == l1.attrs["mask_sha256"]  # SNIP runs in the default layout
    assert json.loads(l2.attrs["config"])["train"]["memory_format"] == "channels-last"


@pytest.mark.launches
def test_bf16_trains_in_bf16_on_every_rank_and_stays_near_np1(tmp_path, monkeypatch):
    """bf16 rounds each rank's partial sums, so np=2 and np=1 part by more than float32's summation order
    (and it compounds: BENCHMARKS.md): close after 10 steps, nearer each other than to float32, not equal."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    (l1, p1), (l2, p2) = (trained(tmp_path, n, "--precision", "bf16", "--max-steps", "10") for n in (1, 2))
    fp32, q = trained(tmp_path, 1, "--max-steps", "10")
    assert l1.attrs["mask_sha256"] == l2.attrs["mask_sha256"] == fp32.attrs["mask_sha256"]  # SNIP in float32
    moved = max(float((p1[n] - q[n]).abs().max()) for n in p1)
    apart = max(float((p1[n] - p2[n]).abs().max()) for n in p1)
    assert moved > 1e-4, "bf16 changed nothing: was autocast applied?"
    assert apart < 0.5 * moved, (apart, moved)  # np=2 is nearer np=1 in bf16 than float32 is
    np.testing.assert_allclose(l2.measurements["val_loss"], l1.measurements["val_loss"], rtol=1e-2)
    assert_pruned_zero(l2, p2)
    assert all(p.dtype == torch.float32 for p in p2.values())  # weights stay float32


@pytest.mark.launches
def test_a_channels_last_study_resumed_at_np2_measures_what_it_would_have(tmp_path, monkeypatch):
    """Capped trials keep their checkpoint; resumed without capping at np=2 they give the uncapped
    study's logs exactly (channels-last weights, their gradients averaged through the flat buffer)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    extra = {"batch_sizes": [32], "model": "simple-cnn", "trials": 4, "max_steps": 150,  # trial 3 is capped
             "config": {"train": {"memory_format": "channels-last"}}}
    spec = write_cap_spec(tmp_path, **extra)
    full = run_study(2, spec, tmp_path / "full", "--no-capping")
    assert full.returncode == 0, describe(full)
    capped = run_study(2, spec, tmp_path / "capped")
    assert capped.returncode == 0 and "CAPPED" in capped.stdout, describe(capped)
    resumed = run_study(2, spec, tmp_path / "capped", "--no-capping")
    assert resumed.returncode == 0 and "(resumed," in resumed.stdout, describe(resumed)
    a, b = by_trial(tmp_path / "full"), by_trial(tmp_path / "capped")
    for path, log in a.items():
        assert b[path].status == log.status, path
        for column, values in log.measurements.items():
            if column != "wall_time":
                np.testing.assert_array_equal(b[path].measurements[column], values, err_msg=f"{path}: {column}")


def test_a_resumed_optimizer_state_is_laid_out_as_every_rank_makes_it():
    """A checkpoint written at np=1 holds channels-last momentum (the gradients' layout there); Horovod's
    optimizer-state broadcast copies bytes into the other ranks' buffers, which they make contiguous, so
    rank 0's must be contiguous too, with the same values."""
    from hvd_sparse.engine import contiguous_state

    conv = torch.nn.Conv2d(2, 3, 3).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.1, momentum=0.9)
    conv(torch.randn(4, 2, 5, 5).contiguous(memory_format=torch.channels_last)).sum().backward()
    optimizer.step()
    buffer = optimizer.state[conv.weight]["momentum_buffer"]
    assert not buffer.is_contiguous()  # what a one-rank channels-last run checkpoints
    values = buffer.clone()
    contiguous_state(optimizer)
    after = optimizer.state[conv.weight]["momentum_buffer"]
    assert after.is_contiguous() and torch.equal(after, values)
