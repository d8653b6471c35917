"""The Lipschitz probe: the closed form on least squares, weights restored bitwise, and the trainer's
measurement at np=1 and np=2, on against off, and across a resume (tests/test_checkpoint.py)."""
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from hvd_sparse.data import Split
from hvd_sparse.lipschitz import GAMMAS, LipschitzProbe, due
from hvd_sparse.log import read_log
from hvd_sparse.mask import Mask
from conftest import REPO, describe, launch_env, mpirun_cmd

D, N = 6, 50


def half_squares(out, target):
    return 0.5 * (out.squeeze(1) - target).square().sum()


def least_squares(keep, chunk=7, rank=0, world=1, reduce=lambda t: t):
    """A linear model under 0.5 |Aw - b|^2 / N: the gradient is H w - A^T b / N with H = A^T A / N."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(N, D, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)
    model = nn.Linear(D, 1, bias=False).double()
    mask = Mask({"weight": keep[None].clone()})
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, D, generator=g, dtype=torch.float64))
    mask.apply_to_params(model)
    return model, mask, a, b, LipschitzProbe(model, mask, Split(a, b), chunk, rank, world, reduce, half_squares)


@pytest.mark.parametrize("keep", [torch.ones(D, dtype=torch.bool), torch.arange(D) % 3 != 0], ids=["dense", "pruned"])
def test_the_constant_of_a_linear_gradient_is_its_hessian_along_the_update(keep):
    model, mask, a, b, probe = least_squares(keep)
    probe.before_step()
    d = torch.randn(1, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * keep
    with torch.no_grad():
        model.weight.add_(d)  # the "optimizer step": any move inside the mask
    value, per_gamma = probe.after_step()
    hessian = a.T @ a / N
    p = torch.diag(keep.double())  # the gradient is read through the mask
    expected = float((p @ hessian @ d[0]).norm() / d[0].norm())
    assert per_gamma == pytest.approx([expected] * len(GAMMAS), rel=1e-9)  # linear: the same for every gamma
    assert value == max(per_gamma)
    full = probe.full_gradient()
    exact = p @ (hessian @ model.weight[0].detach() - a.T @ b / N)
    torch.testing.assert_close(full, exact, rtol=1e-12, atol=1e-12)


def test_ranks_chunks_add_up_to_the_whole_split():
    keep = torch.ones(D, dtype=torch.bool)
    whole = least_squares(keep)[-1].full_gradient()
    parts = [least_squares(keep, rank=r, world=3, reduce=lambda t: t * 0 + t)[-1] for r in range(3)]
    covered = sorted(i for probe in parts for start, stop in probe.chunks for i in range(start, stop))
    assert covered == list(range(N))  # each example in exactly one rank's chunks
    sums = [probe.full_gradient() * N for probe in parts]  # identity reduce: this rank's sum over N
    torch.testing.assert_close(sum(sums) / N, whole, rtol=1e-12, atol=1e-14)


def test_measuring_restores_the_weights_bitwise_and_never_touches_grads():
    model, _, _, _, probe = least_squares(torch.arange(D) % 2 == 0)
    sentinel = torch.full_like(model.weight, 7.0)
    model.weight.grad = sentinel
    probe.before_step()
    with torch.no_grad():
        model.weight.mul_(1.5)
    after = model.weight.detach().clone()
    probe.after_step()
    assert torch.equal(model.weight, after) and model.weight.grad is sentinel and bool((sentinel == 7).all())


def test_due_is_the_step_before_each_multiple():
    assert [s for s in range(30) if due(s, 10)] == [9, 19, 29]
    assert not any(due(s, 0) for s in range(30))


FLAGS = ["--dataset", "synthetic", "--model", "simple-cnn", "--sparsity", "0.9", "--optimizer", "nesterov",
         "--lr", "0.05", "--momentum", "0.9", "--batch-size", "32", "--max-steps", "20", "--eval-every", "10",
         "--goal-error", "0", "--save-model", "--seed", "3", "--no-progress"]


def train(np_, out, *extra):
    """One thread per rank on both world sizes (the same summation order inside each chunk)."""
    cmd = [sys.executable, "-m", "hvd_sparse.train", *FLAGS, "--out", str(out), *extra]
    if np_ > 1:
        cmd = [*mpirun_cmd(np_), *cmd]
    proc = subprocess.run(cmd, env={**launch_env(), "OMP_NUM_THREADS": "1"}, cwd=REPO, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, describe(proc)
    (path,) = out.glob("*.h5")
    return proc, read_log(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    kept = ["--grad-compression", "kept", "--noise-scale-every", "5"]  # gradients as views of one buffer
    for name, np_, extra in (("np1", 1, ["--lipschitz-every", "10"]), ("np2", 2, ["--lipschitz-every", "10"]),
                             ("np2-kept", 2, [*kept, "--lipschitz-every", "10"]), ("np2-kept-off", 2, kept)):
        out[name] = train(np_, tmp_path_factory.mktemp(name), *extra)
    return out


@pytest.mark.launches
def test_np1_and_np2_measure_the_same_constant_at_the_same_steps(runs):
    (_, one), (proc, two) = runs["np1"], runs["np2"]
    assert one.lipschitz["step"].tolist() == two.lipschitz["step"].tolist() == [10, 20]
    np.testing.assert_allclose(two.lipschitz["per_gamma"], one.lipschitz["per_gamma"], rtol=1e-5)
    assert two.lipschitz["per_gamma"].shape == (2, len(GAMMAS))
    assert two.lipschitz["value"].tolist() == two.lipschitz["per_gamma"].max(axis=1).tolist()
    assert np.all(two.lipschitz["value"] > 0) and two.lipschitz["gammas"].tolist() == list(GAMMAS)
    assert "Lipschitz constant" in proc.stdout + proc.stderr  # shown at rank 0


@pytest.mark.launches
def test_measuring_never_changes_the_trajectory(runs):
    """With the gradients as views of one flat buffer and the noise scale measured from them (the harder
    case; the probe's own unit test above covers plain gradients)."""
    (_, on), (_, off) = runs["np2-kept"], runs["np2-kept-off"]
    assert off.lipschitz == {}
    for column in ("val_error", "val_loss", "train_loss", "noise_scale"):
        np.testing.assert_array_equal(on.measurements[column], off.measurements[column], err_msg=column)
    p_on, p_off = torch.load(on.path.with_suffix(".final.pt")), torch.load(off.path.with_suffix(".final.pt"))
    assert all(torch.equal(p_on[n], p_off[n]) for n in p_on)
    assert all(math.isfinite(v) for v in on.lipschitz["value"])
    np.testing.assert_allclose(on.lipschitz["value"], runs["np2"][1].lipschitz["value"], rtol=1e-5)
