"""Gradient synchronization schemes: the kept-entries allreduce vs the dense one; and the same trial on
both engines (Horovod under mpirun, torch.distributed under torchrun)."""
import pytest
import torch
import torch.nn.functional as F

from hvd_sparse import dist, gradsync
from hvd_sparse.log import read_log
from hvd_sparse.mask import Mask
from hvd_sparse.models import build_model
from conftest import describe, run_train, torchrun


@pytest.fixture(scope="module")
def hvd_single():
    dist.init()  # np=1 in this process: collectives are local


def model_and_mask(sparsity=0.8):
    model = build_model("simple-cnn", (1, 16, 16), 10, seed=0)
    g = torch.Generator().manual_seed(1)
    mask = Mask({n: torch.rand(p.shape, generator=g) >= sparsity for n, p in model.named_parameters()})
    mask.apply_to_params(model)
    return model, mask


def backward(model, sync):
    g = torch.Generator().manual_seed(2)
    sync.zero_grad()
    F.cross_entropy(model(torch.randn(8, 1, 16, 16, generator=g)), torch.arange(8)).backward()


@pytest.mark.parametrize("scheme, element_bytes", [("kept", 4), ("kept-fp16", 2)])
def test_kept_entries_sync_keeps_exactly_the_masked_gradient(hvd_single, scheme, element_bytes):
    model, mask = model_and_mask()
    reference, _ = model_and_mask()
    dense = gradsync.gradient_sync("none", [(torch.optim.SGD(reference.parameters(), lr=0.1), reference, mask)])
    kept = gradsync.gradient_sync(scheme, [(torch.optim.SGD(model.parameters(), lr=0.1), model, mask)])
    assert kept.bytes_per_step == mask.num_kept * element_bytes
    assert dense.bytes_per_step == mask.num_total * 4
    for _ in range(2):  # twice: the flat buffer must be reused and re-zeroed
        backward(model, kept)
        kept.synchronize()
        backward(reference, dense)
        dense.synchronize()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert torch.equal(p.grad, q.grad), name  # np=1: no wire, so no fp16 rounding either
            assert torch.count_nonzero(p.grad[~mask[name]]) == 0


def test_kept_entries_sync_rebinds_gradients_that_were_replaced(hvd_single):
    """Horovod's optimizer-state broadcast gives every parameter a fresh p.grad; zero_grad must bind
    p.grad to its view of the flat buffer again, or the allreduce would read stale zeros and the step
    would apply gradients the allreduce never saw."""
    model, mask = model_and_mask()
    reference, _ = model_and_mask()
    sync = gradsync.gradient_sync("kept", [(torch.optim.SGD(model.parameters(), lr=0.1), model, mask)])
    dense = gradsync.gradient_sync("none", [(torch.optim.SGD(reference.parameters(), lr=0.1), reference, mask)])
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # what Horovod's optimizer-state broadcast does
    backward(model, sync)
    flat = sync.flat.data_ptr(), sync.flat.data_ptr() + sync.flat.numel() * sync.flat.element_size()
    for p in model.parameters():
        assert flat[0] <= p.grad.data_ptr() < flat[1]  # a view into the buffer the allreduce sends
    sync.synchronize()
    backward(reference, dense)
    dense.synchronize()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.count_nonzero(q.grad) > 0 and torch.equal(p.grad, q.grad), name


def test_unknown_scheme_is_refused(hvd_single):
    model, mask = model_and_mask()
    with pytest.raises(ValueError, match="valid: none, fp16, kept, kept-fp16"):
        gradsync.gradient_sync("topk", [(torch.optim.SGD(model.parameters(), lr=0.1), model, mask)])


FLAGS = ["--dataset", "synthetic", "--model", "simple-cnn", "--sparsity", "0.9", "--optimizer", "momentum",
         "--lr", "0.05", "--batch-size", "32", "--max-steps", "20", "--eval-every", "10", "--goal-error", "0",
         "--save-model", "--seed", "4"]


SCHEMES = ("none", "kept", "fp16", "kept-fp16")


def run_schemes(tmp_path_factory, launch, engine):
    out = {}
    for scheme in SCHEMES:
        folder = tmp_path_factory.mktemp(f"{engine}-{scheme}")
        proc = launch(2, *FLAGS, "--grad-compression", scheme, "--out", str(folder))
        assert proc.returncode == 0, describe(proc)
        (path,) = folder.glob("*.h5")
        out[scheme] = (read_log(path), torch.load(path.with_suffix(".final.pt")))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same trial at np=2 with each gradient compression, on Horovod."""
    return run_schemes(tmp_path_factory, run_train, "horovod")


@pytest.fixture(scope="module")
def torch_runs(tmp_path_factory):
    """... and on torch.distributed, launched by torchrun."""
    return run_schemes(tmp_path_factory, lambda np, *flags: run_train(np, *flags, launcher=torchrun), "torch")


@pytest.mark.launches
@pytest.mark.parametrize("scheme", SCHEMES)
def test_horovod_and_torch_engines_give_the_same_log(runs, torch_runs, scheme):
    """Every measurement and every final weight, bit for bit: at np=2 an average is (a + b) x 0.5 on
    both engines, whether Horovod sends each tensor or torch one flat vector."""
    (log_h, p_h), (log_t, p_t) = runs[scheme], torch_runs[scheme]
    assert (log_h.attrs["backend"], log_t.attrs["backend"]) == ("horovod", "torch")
    assert log_h.attrs["run_hash"] == log_t.attrs["run_hash"] and log_t.attrs["world_size"] == 2
    assert log_h.attrs["mask_sha256"] == log_t.attrs["mask_sha256"]
    for column, values in log_h.measurements.items():
        if column != "wall_time":
            torch.testing.assert_close(torch.as_tensor(log_t.measurements[column]), torch.as_tensor(values),
                                       rtol=0, atol=0, equal_nan=True, msg=column)
    for name in p_h:
        assert torch.equal(p_h[name], p_t[name]), name


@pytest.mark.launches
def test_kept_is_bitwise_the_same_optimization_as_none_at_np2(runs):
    (log_none, p_none), (log_kept, p_kept) = runs["none"], runs["kept"]
    assert log_none.attrs["world_size"] == log_kept.attrs["world_size"] == 2
    for name in p_none:  # two summands: a + b == b + a, so packing changes no bit
        assert torch.equal(p_none[name], p_kept[name]), name
    assert log_none.measurements["val_loss"].tolist() == log_kept.measurements["val_loss"].tolist()


@pytest.mark.launches
def test_fp16_schemes_stay_close_to_fp32(runs):
    # fp16 rounds each averaged gradient to ~3 significant digits; over 20 momentum steps a few
    # weights drift more, so the whole parameter vector is compared, and the validation loss
    flat = lambda params: torch.cat([v.reshape(-1) for v in params.values()])  # noqa: E731
    p_none, loss_none = flat(runs["none"][1]), runs["none"][0].measurements["val_loss"]
    for scheme in ("fp16", "kept-fp16"):
        p = flat(runs[scheme][1])
        assert not torch.equal(p, p_none)  # it really went through half precision
        assert (p - p_none).norm() / p_none.norm() < 1e-2, scheme
        assert abs(runs[scheme][0].measurements["val_loss"][-1] / loss_none[-1] - 1) < 1e-2, scheme


@pytest.mark.launches
def test_logged_bytes_are_density_times_dense(runs):
    log, _ = runs["none"]
    mask = log.mask
    dense = mask.num_total  # every parameter of simple-cnn is prunable by default
    expected = {"none": dense * 4, "fp16": dense * 2, "kept": mask.num_kept * 4, "kept-fp16": mask.num_kept * 2}
    for scheme, (log, _) in runs.items():
        assert log.attrs["allreduce_bytes_per_step"] == expected[scheme], scheme
        assert log.measurements["allreduce_bytes"].tolist() == [s * expected[scheme] for s in log.measurements["step"]]
    assert expected["kept"] == pytest.approx(0.1 * dense * 4, abs=4)  # density x dense x 4, to one weight


@pytest.mark.launches
def test_pruned_entries_stay_exactly_zero_with_every_scheme(runs):
    for scheme, (log, params) in runs.items():
        for name, keep in log.mask.items():
            assert torch.count_nonzero(params[name][~keep]) == 0, f"{scheme} {name}"
