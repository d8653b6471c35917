"""The training slice end to end, with real Horovod ranks (np=2 on the CPU; mpirun as horovodrun runs it, and
horovodrun itself for the paper's workloads)."""
import subprocess
import sys
import time

import pytest
import torch

from hvd_sparse.config import Config
from hvd_sparse.log import COLUMNS, REQUIRED_ATTRS, TrialLog, read_log
from hvd_sparse.mask import Mask
from conftest import REPO, describe, horovodrun, launch_env, mpirun, rank_lines, run_train

COMMON = [
    "--dataset", "synthetic", "--model", "simple-cnn", "--sparsity", "0.9", "--optimizer", "nesterov",
    "--lr", "0.05", "--momentum", "0.9", "--batch-size", "32", "--max-steps", "20", "--eval-every", "10",
    "--goal-error", "0", "--save-model", "--seed", "3",
]


def only_log(folder):
    logs = sorted(folder.glob("*.h5"))
    assert len(logs) == 1, logs
    return logs[0]


@pytest.fixture(scope="module")
def np1_np2(tmp_path_factory):
    """The same trial at np=1 and at np=2 (same global batch)."""
    out = {}
    for np_ in (1, 2):
        folder = tmp_path_factory.mktemp(f"np{np_}")
        proc = run_train(np_, *COMMON, "--out", str(folder))
        assert proc.returncode == 0, describe(proc)
        out[np_] = (proc, only_log(folder))
    return out


@pytest.mark.launches
def test_np2_is_the_same_optimization_as_np1(np1_np2):
    p1 = torch.load(np1_np2[1][1].with_suffix(".final.pt"))
    p2 = torch.load(np1_np2[2][1].with_suffix(".final.pt"))
    assert p1.keys() == p2.keys()
    for name in p1:
        torch.testing.assert_close(p2[name], p1[name], rtol=1e-5, atol=1e-7, msg=name)
    assert any(not torch.equal(p1[n], torch.zeros_like(p1[n])) for n in p1)  # it did train
    l1, l2 = read_log(np1_np2[1][1]), read_log(np1_np2[2][1])
    assert l1.attrs["mask_sha256"] == l2.attrs["mask_sha256"]  # rank 0's SNIP does not see the world size
    torch.testing.assert_close(torch.tensor(l2.measurements["val_loss"]), torch.tensor(l1.measurements["val_loss"]), rtol=1e-5, atol=0)
    assert l1.measurements["val_error"].tolist() == l2.measurements["val_error"].tolist()


@pytest.mark.launches
def test_pruned_weights_stay_exactly_zero_with_nesterov(np1_np2):
    log = read_log(np1_np2[2][1])
    params = torch.load(log.path.with_suffix(".final.pt"))
    mask = log.mask
    assert abs(mask.num_kept - round(mask.num_total * (1 - 0.9))) <= 1
    assert log.attrs["mask_density"] == pytest.approx(mask.density)
    assert mask.sha256() == log.attrs["mask_sha256"]
    for name, keep in mask.items():
        pruned = params[name][~keep]
        assert pruned.numel() > 0 and torch.count_nonzero(pruned) == 0, name


@pytest.mark.launches
def test_log_schema(np1_np2):
    proc, path = np1_np2[2]
    log = read_log(path)
    assert set(REQUIRED_ATTRS) <= set(log.attrs)
    assert log.attrs["world_size"] == 2 and log.status == "INCOMPLETE" and log.steps_to_result is None
    assert log.config["train"]["batch_size"] == 32 and log.config["prune"]["sparsity"] == 0.9
    assert log.attrs["horovod_version"] == "0.28.1" and log.attrs["torch_version"].startswith("2.")
    assert set(log.measurements) == set(COLUMNS)
    assert log.measurements["step"].tolist() == [0, 10, 20]
    assert all(len(v) == 3 for v in log.measurements.values())
    assert str(path) in proc.stdout and "INCOMPLETE" in proc.stdout


@pytest.mark.launches
def test_every_rank_holds_rank_0s_mask(tmp_path):
    proc = mpirun(2, [str(REPO / "tests" / "rank_programs" / "mask_check.py"), str(tmp_path), "agree"])
    assert proc.returncode == 0, describe(proc)
    m0, m1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert m0.keys() == m1.keys() and all(torch.equal(m0[n], m1[n]) for n in m0)
    density = sum(int(t.sum()) for t in m0.values()) / sum(t.numel() for t in m0.values())
    assert density == pytest.approx(0.2, abs=1e-4)


@pytest.mark.launches
def test_a_mask_mismatch_stops_every_rank(tmp_path, record_property):
    start = time.time()
    proc = mpirun(2, [str(REPO / "tests" / "rank_programs" / "mask_check.py"), str(tmp_path), "mismatch"], timeout=90)
    record_property("time_to_exit_s", round(time.time() - start, 1))
    assert proc.returncode != 0
    for rank in (0, 1):
        assert any("ranks disagree on the mask checksum" in line for line in rank_lines(proc.stdout, rank)), describe(proc)
    assert time.time() - start < 30


@pytest.mark.launches
def test_goal_reached_stops_the_trial_and_records_steps_to_result(tmp_path):
    proc = run_train(2, "--dataset", "synthetic", "--model", "mlp-tiny", "--sparsity", "0.5", "--optimizer", "momentum",
                     "--lr", "0.05", "--batch-size", "64", "--max-steps", "400", "--eval-every", "20",
                     "--goal-error", "0.2", "--out", str(tmp_path))
    assert proc.returncode == 0, describe(proc)
    log = read_log(only_log(tmp_path))
    steps, errors = log.measurements["step"].tolist(), log.measurements["val_error"].tolist()
    assert log.status == "COMPLETE" and log.steps_to_result == steps[-1] > 0
    assert errors[-1] <= 0.2 and all(e > 0.2 for e in errors[:-1])
    assert f"steps_to_result={steps[-1]}" in proc.stdout


@pytest.mark.launches
@pytest.mark.parametrize("dataset, model", [("mnist5k", "simple-cnn"), ("synthetic-cifar", "resnet8")])
def test_the_papers_workloads_train_under_horovodrun(tmp_path, dataset, model):
    proc = run_train(2, "--dataset", dataset, "--model", model, "--sparsity", "0.5", "--optimizer", "nesterov",
                     "--lr", "0.02", "--batch-size", "32", "--max-steps", "30", "--eval-every", "30",
                     "--goal-error", "0", "--snip-batches", "2", "--out", str(tmp_path), launcher=horovodrun)
    assert proc.returncode == 0, describe(proc)
    log = read_log(only_log(tmp_path))
    assert log.attrs["world_size"] == 2 and log.status == "INCOMPLETE"
    val_loss = log.measurements["val_loss"].tolist()
    assert val_loss[-1] < val_loss[0]  # it learns
    assert "layer density:" in proc.stdout and abs(log.mask.density - 0.5) < 1e-4


@pytest.mark.launches
def test_report_test_evaluates_the_test_split_at_the_end(tmp_path):
    proc = run_train(2, "--dataset", "synthetic", "--model", "mlp-tiny", "--batch-size", "32", "--max-steps", "40",
                     "--eval-every", "20", "--goal-error", "0", "--report-test", "--out", str(tmp_path))
    assert proc.returncode == 0, describe(proc)
    log = read_log(only_log(tmp_path))
    assert 0.0 <= log.attrs["test_error"] < 0.5 and log.attrs["test_loss"] > 0
    assert f"test_error={log.attrs['test_error']:.4f}" in proc.stdout


def single_rank(*flags, **kw):
    """np=1 without any launcher: hvd.init() alone must work for quick local runs."""
    cmd = [sys.executable, "-m", "hvd_sparse.train", "--no-progress", *flags]
    return subprocess.Popen(cmd, env=launch_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.launches
def test_divergence_is_infeasible_not_a_crash(tmp_path):
    proc = single_rank("--dataset", "synthetic", "--model", "mlp-tiny", "--lr", "1e8", "--max-steps", "50",
                       "--eval-every", "10", "--out", str(tmp_path))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    log = read_log(only_log(tmp_path))
    assert log.status == "INFEASIBLE" and log.steps_to_result is None and "INFEASIBLE" in out


@pytest.mark.launches
def test_log_is_readable_while_the_run_goes_on(tmp_path):
    proc = single_rank("--dataset", "synthetic", "--model", "simple-cnn", "--max-steps", "100000", "--eval-every", "5",
                       "--goal-error", "0", "--out", str(tmp_path))
    try:
        deadline, seen = time.time() + 120, 0
        while time.time() < deadline and seen < 4:
            logs = list(tmp_path.glob("*.h5"))
            if logs:
                log = read_log(logs[0])
                assert log.status == "RUNNING"
                seen = len(log.measurements["step"])
            time.sleep(0.2)
        assert seen >= 4 and proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
    log = read_log(logs[0])  # killed mid-run: still readable, still RUNNING, nothing lost
    assert log.status == "RUNNING" and len(log.measurements["step"]) >= 4


@pytest.mark.launches
def test_linear_schedule_is_applied_in_the_loop(tmp_path):
    """Decay to lr * 1e-6 after one step: 40 steps then end (almost) where 2 steps do."""
    def final_params(name, *flags):
        proc = single_rank("--dataset", "synthetic", "--model", "mlp-tiny", "--lr", "0.1", "--eval-every", "50",
                           "--goal-error", "0", "--save-model", "--out", str(tmp_path / name), *flags)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        return torch.load(only_log(tmp_path / name).with_suffix(".final.pt"))

    decay = ["--schedule", "linear", "--decay-steps", "1", "--end-factor", "1e-6"]
    two, forty = final_params("two", "--max-steps", "2", *decay), final_params("forty", "--max-steps", "40", *decay)
    constant = final_params("constant", "--max-steps", "40")
    for name in two:
        torch.testing.assert_close(forty[name], two[name], rtol=0, atol=1e-5)
    assert max((constant[n] - two[n]).abs().max().item() for n in two) > 1e-2


# One case per stage a bad input is caught at (arguments, values, registries, the world size, SNIP, data,
# output); the other checks of the first three stages are ``test_cli``'s, in-process.
BAD_INPUTS = [
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--model", "vgg"], "unknown model 'vgg'"),
    (["--sparsity", "1.0"], "--sparsity must be in [0, 1)"),
    (["--sparsity", "0.999999999"], "--sparsity 0.999999999 keeps none of the 8554 prunable weights"),
    (["--batch-size", "33"], "--batch-size 33 is not divisible by the 2 ranks"),
    (["--batch-size", "3.5"], "argument --batch-size: invalid int value: '3.5'"),
    (["--data-dir", "/nonexistent/data"], "no such directory"),
    (["--dataset", "mnist", "--data-dir", "/tmp"], "train-images-idx3-ubyte: file not found"),
    (["--dataset", "mnist5k", "--report-test"], "dataset mnist5k has no test split"),
    (["--out", "{tmp}/runs/earlier.h5/sub"], "--out {tmp}/runs/earlier.h5/sub: cannot write there: Not a directory"),
]


@pytest.mark.launches
@pytest.mark.parametrize("flags, message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_fails_on_every_rank_without_hanging(tmp_path, flags, message, record_property):
    out = tmp_path / "runs"
    earlier = out / "earlier.h5"  # a log already there is left exactly as it was
    TrialLog.create(earlier, {"config": "{}", "run_hash": "0"}, Mask({"w": torch.ones(4, dtype=torch.bool)}))
    before = (earlier.read_bytes(), earlier.stat().st_mtime_ns)
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    base = ["--dataset", "synthetic", "--model", "mlp-tiny", "--max-steps", "5", "--out", str(out)]
    start = time.time()
    proc = run_train(2, *base, *flags, timeout=60)
    elapsed = time.time() - start
    record_property("time_to_exit_s", round(elapsed, 1))
    assert proc.returncode != 0
    for rank in (0, 1):
        errors = [line for line in rank_lines(proc.stdout + proc.stderr, rank) if "error:" in line]
        assert len(errors) == 1 and message.replace("{tmp}", str(tmp_path)) in errors[0], describe(proc)
    assert elapsed < 30
    assert [p.name for p in tmp_path.rglob("*.h5")] == ["earlier.h5"]
    assert (earlier.read_bytes(), earlier.stat().st_mtime_ns) == before


@pytest.mark.parametrize("model_name, shape", [("simple-cnn", (1, 28, 28)), ("resnet8", (3, 32, 32)), ("mlp-tiny", (1, 8, 8))])
def test_evaluation_through_the_channels_last_twin_matches_the_model(model_name, shape):
    """The evaluator's twin sees the trained weights of the moment (and BatchNorm's running
    statistics), counts the same errors and the same loss up to float summation order, and leaves
    the trained model's layout and mode alone."""
    from hvd_sparse import dist
    from hvd_sparse.data import Split
    from hvd_sparse.models import build_model
    from hvd_sparse.engine import Evaluator

    dist.init()
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randn(300, *shape, generator=g), torch.randint(0, 10, (300,), generator=g))
    model = build_model(model_name, shape, 10, seed=0)
    evaluate = Evaluator(model, torch.device("cpu"), Config())
    assert (evaluate.twin is not None) == (model_name != "mlp-tiny")
    for _ in range(2):  # train a little between evaluations: the twin must follow
        model.train()
        torch.nn.functional.cross_entropy(model(split.x[:64]), split.y[:64]).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.5 * p.grad
        errors, count, loss = evaluate(split, 128).tolist()
        assert model.training  # the loop goes on training
        model.eval()
        with torch.inference_mode():
            logits = model(split.x)
        assert count == 300 and errors == (logits.argmax(1) != split.y).sum().item()
        assert loss == pytest.approx(torch.nn.functional.cross_entropy(logits, split.y, reduction="sum").item(), rel=1e-5)
        assert all(p.is_contiguous() for p in model.parameters())


@pytest.mark.launches
def test_micro_batches_at_np2_are_the_same_optimization_as_np1(tmp_path, monkeypatch):
    """Each rank passes its shard of 16 in pieces of 5 (5, 5, 5, 1), with the noise scale measured too."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    finals = {}
    for np_, extra in ((1, []), (2, ["--micro-batch-size", "5"])):
        out = tmp_path / f"np{np_}"
        proc = run_train(np_, *COMMON, "--noise-scale-every", "3", *extra, "--out", str(out))
        assert proc.returncode == 0, describe(proc)
        log = only_log(out)
        finals[np_] = (read_log(log), torch.load(log.with_suffix(".final.pt")))
    (l1, p1), (l2, p2) = finals[1], finals[2]
    for name in p1:
        torch.testing.assert_close(p2[name], p1[name], rtol=1e-5, atol=1e-7, msg=name)
    assert l1.measurements["val_error"].tolist() == l2.measurements["val_error"].tolist()
    assert l1.attrs["run_hash"] == l2.attrs["run_hash"]  # how a rank passes its shard is not what is trained
