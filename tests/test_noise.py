"""The gradient noise scale: the estimator by hand, then the trainer's measurement against closed form."""
import json
import math

import numpy as np
import pytest
import torch

from hvd_sparse.aggregate import noise_table
from hvd_sparse.log import read_log
from hvd_sparse.noise import NoiseScale
from conftest import REPO, describe, mpirun, run_train


def test_estimator_recovers_g2_and_trace_from_exact_expectations():
    """Fed the exact E|g_B|^2 = |G|^2 + tr(Sigma) / B at two batch sizes, it returns both unknowns."""
    g2, trace = 3.0, 48.0
    noise = NoiseScale(smoothing=0.5)
    for b_small, b_big in ((8, 16), (32, 64), (1, 2)):
        noise.update(g2 + trace / b_small, g2 + trace / b_big, b_small, b_big)
        assert noise.grad_sq == pytest.approx(g2) and noise.grad_trace == pytest.approx(trace)
        assert noise.b_simple == pytest.approx(16.0)


def test_smoothing_is_a_bias_corrected_moving_average():
    noise = NoiseScale(smoothing=0.9)
    assert math.isnan(noise.b_simple) and math.isnan(noise.grad_sq)
    noise.update(2.0 + 10.0, 2.0 + 5.0, 1, 2)  # |G|^2 = 2, tr = 10
    assert noise.grad_sq == pytest.approx(2.0)  # one measurement: itself, not 0.1 of it
    noise.update(4.0 + 10.0, 4.0 + 5.0, 1, 2)  # |G|^2 = 4
    assert noise.grad_sq == pytest.approx((0.9 * 0.1 * 2 + 0.1 * 4) / (1 - 0.81))
    restored = NoiseScale(smoothing=0.9)
    restored.restore(noise.state)
    assert restored.b_simple == noise.b_simple
    with pytest.raises(ValueError):
        noise.update(1.0, 1.0, 4, 4)


def test_no_estimate_while_the_gradient_is_all_noise():
    noise = NoiseScale(smoothing=0.0)
    noise.update(4.0, 1.5, 8, 16)  # |G|^2 estimate negative: B_simple is undefined, not negative
    assert noise.grad_sq < 0 and math.isnan(noise.b_simple)
    noise.update(1.0, 1.5, 8, 16)  # small-batch norm below the big one: a negative variance estimate
    assert noise.grad_trace < 0 and math.isnan(noise.b_simple)


@pytest.fixture(scope="module")
def linear(tmp_path_factory):
    """The trainer's measurement on linear regression at np=2 and np=1 (halves), same global batch."""
    out = {}
    for np_, scheme, masked in ((2, "none", "dense"), (1, "none", "dense"), (2, "kept", "masked")):
        path = tmp_path_factory.mktemp("noise") / "result.json"
        proc = mpirun(np_, [str(REPO / "tests" / "rank_programs" / "noise_linear.py"), str(path), scheme, masked,
                                "1000"], timeout=240)
        assert proc.returncode == 0, describe(proc)
        out[(np_, masked)] = json.loads(path.read_text())
    return out


@pytest.mark.launches
@pytest.mark.parametrize("case", [(2, "dense"), (1, "dense"), (2, "masked")], ids=["np2", "np1-halves", "np2-masked"])
def test_estimate_matches_the_closed_form_within_10_percent(linear, case):
    result = linear[case]
    for key in ("b_simple", "grad_sq", "grad_trace"):
        assert result[key] == pytest.approx(result["exact"][key], rel=0.10), (key, result)


@pytest.mark.launches
def test_np1_halves_and_np2_agree_for_the_same_global_batch(linear):
    assert linear[(1, "dense")]["b_simple"] == pytest.approx(linear[(2, "dense")]["b_simple"], rel=0.10)


@pytest.mark.launches
def test_only_unpruned_entries_count(linear):
    dense, masked = linear[(2, "dense")], linear[(2, "masked")]
    assert masked["exact"]["grad_trace"] < 0.7 * dense["exact"]["grad_trace"]  # half the entries pruned
    assert masked["grad_trace"] == pytest.approx(masked["exact"]["grad_trace"], rel=0.10)


@pytest.mark.launches
def test_training_logs_the_noise_scale_at_every_evaluation(tmp_path):
    proc = run_train(2, "--dataset", "synthetic", "--model", "simple-cnn", "--sparsity", "0.8", "--batch-size", "32",
                     "--max-steps", "40", "--eval-every", "10", "--goal-error", "0", "--noise-scale-every", "2",
                     "--grad-compression", "kept", "--out", str(tmp_path))
    assert proc.returncode == 0, describe(proc)
    (path,) = tmp_path.glob("*.h5")
    m = read_log(path).measurements
    assert math.isnan(m["noise_scale"][0])  # step 0: nothing measured yet
    assert np.isfinite(m["grad_trace"][1:]).all() and (m["grad_trace"][1:] > 0).all()
    assert np.isfinite(m["noise_scale"][1:]).sum() >= 2


def test_aggregator_sets_the_noise_scale_at_the_goal_beside_the_critical_batch_size():
    import pandas as pd

    key = {"dataset": "d", "model": "m", "pruning": "snip", "optimizer": "sgd", "schedule": "constant", "goal_error": 0.1, "sparsity": 0.5}
    studies = pd.DataFrame([{**key, "batch_size": b, "best_noise_scale": v} for b, v in ((16, 30.0), (32, 50.0),
                                                                                          (64, 40.0), (128, math.nan))])
    curves = pd.DataFrame([{**key, "critical_batch_size": 32.0, "diminishing_batch_size": 80.0}])
    (row,) = noise_table(studies, curves).itertuples()
    assert (row.batch_sizes, row.noise_scale_at_goal, row.noise_scale_min, row.noise_scale_max) == (3, 40.0, 30.0, 50.0)
    assert row.critical_batch_size == 32.0 and row.predicted_over_measured == pytest.approx(1.25)
    assert row.predicted_over_diminishing == pytest.approx(0.5)


@pytest.mark.parametrize("halves", [False, True])
@pytest.mark.parametrize("micro", [1, 3, 7])
def test_micro_batches_give_the_gradient_of_the_whole_part(halves, micro):
    """Pieces of ``micro`` examples, each weighted by its share: the gradient, the loss and (with halves)
    the squared norms of the parts are those of one pass, up to float summation order."""
    from torch import nn

    from hvd_sparse.noise import local_gradients

    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(12, 5, generator=g), torch.randint(0, 3, (12,), generator=g)
    losses_of = lambda part: [torch.nn.functional.cross_entropy(model(x[part]), y[part])]  # noqa: E731
    results = []
    for m in (0, micro):
        model.zero_grad(set_to_none=True)
        loss, sq = local_gradients([model], losses_of, 12, [[None] * 4], halves=halves, micro_batch=m)
        results.append((loss[0].item(), sq.tolist(), [p.grad.clone() for p in model.parameters()]))
    (l0, s0, g0), (l1, s1, g1) = results
    assert l1 == pytest.approx(l0, rel=1e-6) and s1 == pytest.approx(s0, rel=1e-5)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(a, b) for a, b in zip(g0, g1)) or micro >= (6 if halves else 12)  # really in pieces
