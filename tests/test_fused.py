"""Fused trials: T trials of one cell trained as one model (``hvd_sparse.fused`` and the engine's
slots). Each fused trial must be the trial trained alone, up to float summation order; fused at np=2
must be fused at np=1; a trial that diverges must leave its neighbours bit for bit as they were."""
import json
import re
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch
import torch.nn.functional as F

from hvd_sparse import fused
from hvd_sparse.config import Config, ConfigError
from hvd_sparse.engine import check_fusable
from hvd_sparse.log import read_log
from hvd_sparse.models import MODELS, build_model
from hvd_sparse.study import StudySpec
from conftest import REPO, describe, launch_env, mpirun, rank_lines, torchrun
from test_study import RUN_SPEC, assert_same_study, logs_of, run_study, study_cmd, write_spec

SHAPES = {"resnet8": (3, 32, 32)}  # the others take 28x28 grey images


def models_and_batches(name, trials=3, batch=8):
    shape = SHAPES.get(name, (1, 28, 28))
    g = torch.Generator().manual_seed(1)
    models = [build_model(name, shape, 10, seed=t) for t in range(trials)]
    return models, torch.randn(trials, batch, *shape, generator=g), torch.randint(0, 10, (trials, batch), generator=g)


def grads_alone(model, x, y):
    model.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registry_model_fused_is_each_model_alone(name):
    """Losses, gradients and evaluation of 3 fused models equal each model's own (float order, 1e-5)."""
    torch.manual_seed(0)
    models, x, y = models_and_batches(name)
    alone = [grads_alone(m, x[t], y[t]) for t, m in enumerate(models)]
    for m in models:
        m.zero_grad()
    losses = fused.losses(models, x, y)
    losses.sum().backward()
    for t, m in enumerate(models):
        torch.testing.assert_close(losses[t].detach(), alone[t][0], rtol=1e-5, atol=0)
        for p, g in zip(m.parameters(), alone[t][1]):
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6 * float(g.abs().max()))
    evaluation = fused.evaluate(models, x[0], y[0], batch_size=5)
    for t, m in enumerate(models):
        logits = m(x[0])
        errors = float((logits.argmax(1) != y[0]).sum())
        loss_sum = float(F.cross_entropy(logits, y[0], reduction="sum").detach())
        assert evaluation[t, :2].tolist() == [errors, 8.0]
        assert evaluation[t, 2].item() == pytest.approx(loss_sum, rel=1e-5)


def test_a_non_finite_trial_leaves_the_others_gradients_bitwise_unchanged():
    """A trial's gradient depends on its own parameters and batch only: NaN weights in another slot,
    or that slot gone from the array, change none of its bits."""
    models, x, y = models_and_batches("simple-cnn", trials=4)

    def gradients(ms, xs, ys):
        for m in ms:
            m.zero_grad()
        fused.losses(ms, xs, ys).sum().backward()
        return [[p.grad.clone() for p in m.parameters()] for m in ms]

    before = gradients(models, x, y)
    poisoned = build_model("simple-cnn", (1, 28, 28), 10, seed=1)
    with torch.no_grad():
        for p in poisoned.parameters():
            p.fill_(float("nan"))
    after = gradients([models[0], poisoned, *models[2:]], x, y)
    fewer = gradients([models[0], *models[2:]], x[[0, 2, 3]], y[[0, 2, 3]])
    for t, t_fewer in ((0, 0), (2, 1), (3, 2)):
        assert all(torch.equal(a, b) for a, b in zip(before[t], after[t]))
        assert all(torch.equal(a, b) for a, b in zip(before[t], fewer[t_fewer]))
    last = gradients([models[3]], x[[3]], y[[3]])  # the last one left of its array
    assert all(torch.equal(a, b) for a, b in zip(before[3], last[0]))
    assert all(torch.isnan(g).all() for g in after[1])


def test_fuse_is_how_not_what_so_it_stays_out_of_the_study_hash():
    base = StudySpec.from_dict(RUN_SPEC)
    fused_spec = StudySpec.from_dict({**RUN_SPEC, "fuse": 8})
    assert fused_spec.fuse == 8 and fused_spec.study_hash() == base.study_hash()
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ConfigError, match="fuse must be a positive number of trials"):
            StudySpec.from_dict({**RUN_SPEC, "fuse": bad})


def test_fused_trials_refuse_the_lipschitz_probe_of_one_model():
    check_fusable(Config.from_dict({"train": {"noise_scale_every": 1}}))
    with pytest.raises(ConfigError, match="fused trials do not measure the Lipschitz constant"):
        check_fusable(Config.from_dict({"train": {"lipschitz_every": 10}}))


# -- the engine, real ranks ---------------------------------------------------------------------

PROGRAM = str(REPO / "tests" / "rank_programs" / "fused_trials.py")


def train_six(out, np_, fuse, compression="none", diverge=None, launcher="mpirun"):
    """tests/rank_programs/fused_trials.py: six trials of one cell, ``fuse`` at a time, one thread a rank."""
    out.mkdir()
    args = [PROGRAM, str(out), str(fuse), "simple-cnn", compression, *([str(diverge)] if diverge is not None else [])]
    if np_ == 1:
        proc = subprocess.run([sys.executable, *args], env={**launch_env(), "OMP_NUM_THREADS": "1"}, cwd=REPO,
                              capture_output=True, text=True, timeout=240)
    else:
        proc = (mpirun if launcher == "mpirun" else torchrun)(np_, args)
    assert proc.returncode == 0, describe(proc)
    results = json.loads((out / "results.json").read_text())
    weights = {r["trial"]: torch.load(out / f"{r['trial']}.final.pt") for r in results}
    return results, weights, {r["trial"]: read_log(out / f"{r['trial']}.h5") for r in results}


def relative_difference(a, b):
    return max(float((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-30)) for n in b)


@pytest.fixture(scope="module")
def fused_np1(tmp_path_factory):
    return train_six(tmp_path_factory.mktemp("fused") / "np1", 1, fuse=4)


@pytest.mark.launches
def test_a_fused_trial_is_the_trial_trained_alone(fused_np1, tmp_path):
    """Six trials, four at a time (two refill freed slots), against each trained alone with the same
    thread count: after 20 steps the weights agree to 1e-5 relative, the masks bit for bit, and every
    logged evaluation to 1e-5. (Every registry model fuses: the first test of this module.)"""
    (fused_results, fused_weights, fused_logs) = fused_np1
    (alone_results, alone_weights, alone_logs) = train_six(tmp_path / "alone", 1, fuse=1)
    assert sorted(map(json.dumps, fused_results)) == sorted(map(json.dumps, alone_results))  # status, steps, mask
    for trial, weights in alone_weights.items():
        assert relative_difference(fused_weights[trial], weights) <= 1e-5, trial
        for column in ("val_loss", "train_loss"):
            np.testing.assert_allclose(fused_logs[trial].measurements[column], alone_logs[trial].measurements[column],
                                       rtol=1e-5, err_msg=f"{trial} {column}")
        assert (fused_logs[trial].attrs["fuse"], alone_logs[trial].attrs["fuse"]) == (4, 1)
        assert fused_logs[trial].attrs["allreduce_bytes_per_step"] == alone_logs[trial].attrs["allreduce_bytes_per_step"]


@pytest.mark.launches
@pytest.mark.parametrize("launcher, compression", [("mpirun", "none"), ("mpirun", "kept"), ("torchrun", "none")])
def test_fused_at_np2_is_fused_at_np1(fused_np1, tmp_path, launcher, compression):
    """Two ranks, each with half of every trial's batch, one allreduce a step for all five trials of
    the array (dense, or the kept entries of all five masks), then the sixth alone: the np=1 weights
    (four at a time) to float summation order, on either engine."""
    results, weights, logs = train_six(tmp_path / "np2", 2, fuse=5, compression=compression, launcher=launcher)
    np1_results, np1_weights, _ = fused_np1
    assert results == np1_results
    for trial in weights:
        assert relative_difference(weights[trial], np1_weights[trial]) <= 1e-5, trial
        assert logs[trial].attrs["world_size"] == 2
        assert logs[trial].attrs["backend"] == ("horovod" if launcher == "mpirun" else "torch")


@pytest.mark.launches
def test_a_trial_left_alone_midway_at_np2_keeps_its_optimizer_state(fused_np1, tmp_path):
    """Five at a time on Horovod at np=2, trial 1 diverging at once: trial 5 takes its slot at step 1
    and trains its last steps alone, its momentum carried over. Every other trial still ends at the
    np=1 weights to float summation order (a lone trial once went through Horovod's optimizer
    wrapper, which starts with an empty state)."""
    results, weights, _ = train_six(tmp_path / "np2", 2, fuse=5, diverge=1)
    _, np1_weights, _ = fused_np1
    assert {r["trial"]: r["status"] for r in results}["trial-1"] == "INFEASIBLE"
    for trial in np1_weights:
        if trial != "trial-1":
            assert relative_difference(weights[trial], np1_weights[trial]) <= 1e-5, trial


@pytest.mark.launches
def test_a_diverging_trial_leaves_its_neighbours_bitwise_unchanged(fused_np1, tmp_path):
    """Trial 1 at learning rate 1e6 ends INFEASIBLE at once and trial 4 takes its slot early: every
    other trial's weights and logged evaluations are bit for bit those of the run without it."""
    results, weights, logs = train_six(tmp_path / "diverging", 1, fuse=4, diverge=1)
    _, np1_weights, np1_logs = fused_np1
    status = {r["trial"]: r["status"] for r in results}
    assert status.pop("trial-1") == "INFEASIBLE" and set(status.values()) == {"INCOMPLETE"}
    assert [r["trial"] for r in results][0] == "trial-1"  # it ended first, so trial 4 started early
    for trial in status:
        assert all(torch.equal(weights[trial][n], np1_weights[trial][n]) for n in weights[trial]), trial
        for column in ("val_loss", "val_error", "train_loss"):
            np.testing.assert_array_equal(logs[trial].measurements[column], np1_logs[trial].measurements[column])


# -- fused studies --------------------------------------------------------------------------------


def assert_close_studies(a_root, b_root, rtol=1e-5, noise_rtol=1e-3):
    """The same trials, statuses and masks; every logged evaluation to ``rtol``, the noise-scale
    estimates (differences of nearly equal norms) to ``noise_rtol``."""
    (da, la), (db, lb) = logs_of(a_root), logs_of(b_root)
    assert [p.relative_to(da) for p in la] == [p.relative_to(db) for p in lb]
    for pa, pb in zip(la, lb):
        a, b = read_log(pa), read_log(pb)
        assert (a.status, a.steps_to_result, a.attrs["mask_sha256"]) == (b.status, b.steps_to_result, b.attrs["mask_sha256"])
        np.testing.assert_array_equal(a.measurements["step"], b.measurements["step"])
        for column in ("val_loss", "train_loss"):
            np.testing.assert_allclose(a.measurements[column], b.measurements[column], rtol=rtol, err_msg=f"{pa} {column}")
        for column in ("grad_sq", "grad_trace"):
            np.testing.assert_allclose(a.measurements[column], b.measurements[column], rtol=noise_rtol, err_msg=f"{pa} {column}")


@pytest.mark.launches
def test_a_fused_packed_study_on_torchrun_is_the_unfused_study(tmp_path, monkeypatch):
    """torchrun np=2 --pack 2 --fuse 2: each group fuses the trials it takes, measuring the gradient
    noise scale; every log is the unfused np=1 study's to 1e-5 with the same masks (the noise-scale
    estimates to 1e-3), and a rerun skips every trial."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec_path = write_spec(tmp_path, batch_sizes=[16, 32], trials=3, max_steps=60, eval_every=20,
                           config={"train": {"noise_scale_every": 2}})
    args = ["-m", "hvd_sparse.study", str(spec_path), "--out", str(tmp_path / "fused"), "--pack", "2", "--fuse", "2"]
    fused_run = torchrun(2, args, timeout=300)
    assert fused_run.returncode == 0, describe(fused_run)
    assert "2 trials of a cell fused" in fused_run.stdout
    alone = run_study(1, spec_path, tmp_path / "alone")
    assert alone.returncode == 0, describe(alone)
    assert_close_studies(tmp_path / "alone", tmp_path / "fused")
    assert {read_log(p, with_mask=False).attrs["fuse"] for p in logs_of(tmp_path / "fused")[1]} == {2}
    rerun = torchrun(2, args, timeout=120)
    assert rerun.returncode == 0 and rerun.stdout.count("(skipped,") == 6, describe(rerun)


@pytest.mark.launches
def test_a_stop_signal_checkpoints_every_fused_trial_and_the_rerun_measures_the_same(tmp_path):
    """SIGTERM to rank 1 of a np=2 --fuse 2 study while both trials of batch 16 train: exit 0, both
    checkpointed at their step; the rerun resumes both, and its logs are bitwise those of the same
    fused study uninterrupted."""
    spec_path = write_spec(tmp_path, batch_sizes=[16], trials=3, max_steps=300, eval_every=50)
    whole = run_study(2, spec_path, tmp_path / "whole", "--fuse", "2")
    assert whole.returncode == 0, describe(whole)
    root = tmp_path / "runs"
    proc = subprocess.Popen(study_cmd(2, spec_path, root, "--fuse", "2"), env=launch_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 240
    while not (root.exists() and len(list(root.rglob("*.ckpt.pt"))) == 2) and time.time() < deadline:
        assert proc.poll() is None, "the study ended before the signal"
        time.sleep(0.02)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if p.cmdline()[1:3] == ["-m", "hvd_sparse.study"]]
    assert len(workers) == 2
    workers[-1].send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and re.search(r"INTERRUPTED: stopped by .* at steps \d+, \d+: run the same command", out), out
    stopped = [read_log(p) for p in sorted(root.rglob("trial-00[01].h5"))]
    assert [log.status for log in stopped] == ["RUNNING"] * 2 and all(log.attrs["interruptions"] == 1 for log in stopped)
    rerun = run_study(2, spec_path, root, "--fuse", "2")
    assert rerun.returncode == 0, describe(rerun)
    out = "\n".join(rank_lines(rerun.stdout, 0))
    assert out.count("(resumed,") == 2 and out.count("(ran,") == 1, out
    assert_same_study(tmp_path / "whole", root)
