"""The MNIST replication's specs (studies/mnist-*.yaml): they validate, they are the grid the results page
(docs/mnist-study/index.md) says, and a two-cell slice of it runs on the real data and measures exactly
what the committed tables say."""
import copy

import pandas as pd
import pytest
import torch

from hvd_sparse.log import read_log
from hvd_sparse.data import SYSTEM_DATA_DIRS
from hvd_sparse.study import StudySpec, grid
from conftest import REPO, describe, mpirun, spec_slice

STUDIES = REPO / "studies"
FIGURES = REPO / "docs" / "mnist-study"
# two cells of the grid whose first trial ended COMPLETE in the committed run (a trial alone in its
# cell is never capped, so the rerun must reach the goal at the same step)
SLICE = {"spec": "mnist-sgd", "optimizer": "sgd", "sparsity": 0.0, "batch_sizes": [16, 32]}


def load(name):
    return StudySpec.load(STUDIES / f"{name}.yaml")


SPECS = ("mnist-sgd", "mnist-nesterov", "mnist-momentum")


def test_the_specs_validate_and_cover_the_papers_grid():
    specs = [load(name) for name in SPECS]
    assert [spec.optimizers for spec in specs] == [("sgd",), ("nesterov",), ("momentum",)]
    for spec in specs:
        assert spec.dataset == "mnist" and spec.data_dir is None  # the files set-up writes
        assert spec.model == "simple-cnn"
        assert sorted(spec.sparsities) == [0.0, 0.5, 0.7, 0.9]
        # Momentum goes on to 2,048: all four of its curves still fell at 1,024
        grid_ = (8, 16, 32, 64, 128, 256, 512, 1024)
        assert spec.batch_sizes == (grid_ + (2048,) if spec.optimizers == ("momentum",) else grid_)
        assert len(grid(spec)) == len(spec.sparsities) * len(spec.batch_sizes) * 3


def test_the_lipschitz_study_is_trial_0_of_the_nesterov_grid_at_batch_128():
    """studies/mnist-lipschitz.yaml measures finding 5 on the very trial of the main grid it names: same
    learning rate, seed, pruning and training settings, with the Lipschitz probe added."""
    main = {(t.sparsity, t.trial_id): t for t in grid(load("mnist-nesterov")) if t.batch_size == 128}
    probes = grid(load("mnist-lipschitz"))
    assert sorted(t.sparsity for t in probes) == [0.0, 0.5, 0.7, 0.9]
    for probe in probes:
        cfg, twin = probe.config.to_dict(), main[(probe.sparsity, 0)].config.to_dict()
        assert cfg["train"].pop("lipschitz_every") == 150 and twin["train"].pop("lipschitz_every") == 0
        twin["train"]["max_steps"] = 1200  # the probe's own budget: it stops at the goal (step 175 or later)
        for part in ("data", "model", "prune", "optim", "train"):  # the seed is train's
            assert cfg[part] == twin[part], part


def test_the_three_optimizers_share_goal_budgets_and_evaluations_and_the_momentum_methods_their_rates():
    sgd = load("mnist-sgd")
    trials = {(t.optimizer, t.sparsity, t.batch_size, t.trial_id): t.config.to_dict()
              for name in SPECS[1:] for t in grid(load(name))}
    for t in grid(sgd):
        cfg = t.config.to_dict()
        nesterov = trials[("nesterov", t.sparsity, t.batch_size, t.trial_id)]
        assert cfg["train"] == nesterov["train"] and cfg["prune"] == nesterov["prune"]
    assert {key[1] for key in trials if key[0] == "momentum"} == {0.0, 0.5, 0.7, 0.9}
    for (optimizer, sparsity, batch, trial), cfg in trials.items():
        if optimizer == "momentum" and batch == 2048:  # batch 1,024's rate, budget and evaluations
            twin = copy.deepcopy(trials[("momentum", sparsity, 1024, trial)])
            assert cfg["train"].pop("batch_size") == 2048 and twin["train"].pop("batch_size") == 1024
            assert cfg == twin
    for (optimizer, sparsity, batch, trial), cfg in trials.items():
        if optimizer == "momentum" and batch <= 1024:
            twin = trials[("nesterov", sparsity, batch, trial)]
            assert cfg["optim"].pop("optimizer") == "momentum" and twin["optim"].pop("optimizer") == "nesterov"
            assert cfg == twin


def committed_trial(batch: int) -> pd.Series:
    table = pd.read_csv(FIGURES / "trials.csv")
    rows = table[(table.optimizer == SLICE["optimizer"]) & (table.sparsity == SLICE["sparsity"])
                 & (table.batch_size == batch) & (table.trial_id == 0)]
    assert len(rows) == 1, f"trials.csv has {len(rows)} rows for batch {batch}"
    return rows.iloc[0]


def test_the_slices_committed_trials_are_complete():
    """The slice is only a check if the trials it reruns reached the goal in the committed run."""
    for batch in SLICE["batch_sizes"]:
        assert committed_trial(batch).status == "COMPLETE"


@pytest.mark.launches
def test_a_two_cell_slice_runs_on_the_real_data_and_measures_the_committed_trials(tmp_path):
    """The full MNIST (set-up writes it), two trials side by side (np=2 --pack 2), as `make
    replicate-mnist` runs them. On a CPU with the committed run's kernels (cpu_capability.txt) every
    trial measures exactly the committed steps-to-result and best validation error; another CPU sums
    the convolutions in another order, and there the status must agree and the steps be within 30%."""
    folder = SYSTEM_DATA_DIRS["MNIST"][0]
    assert any(folder.glob("train-images-idx3-ubyte*")), f"the full MNIST is not in {folder}: `make setup` writes it there"
    spec = spec_slice(STUDIES / f"{SLICE['spec']}.yaml", tmp_path, "mnist-slice", optimizers=[SLICE["optimizer"]],
                      sparsities=[SLICE["sparsity"]], batch_sizes=SLICE["batch_sizes"], trials=1)
    out = tmp_path / "runs"
    proc = mpirun(2, ["-m", "hvd_sparse.study", str(spec), "--out", str(out), "--pack", "2"], timeout=150)
    assert proc.returncode == 0, describe(proc)
    logs = sorted(out.rglob("trial-*.h5"))
    assert len(logs) == len(SLICE["batch_sizes"]), f"expected one log per cell, found {logs}"
    same_kernels = torch.backends.cpu.get_cpu_capability() == (FIGURES / "cpu_capability.txt").read_text().strip()
    for path in logs:
        log = read_log(path, with_mask=False)
        batch = log.config["train"]["batch_size"]
        row = committed_trial(batch)
        assert log.status == row.status, (batch, log.status, row.status)
        if same_kernels:
            assert (log.steps_to_result, round(log.attrs["best_val_error"], 6)) == (
                row.steps_to_result, round(row.best_val_error, 6)), batch
        else:
            assert log.steps_to_result == pytest.approx(row.steps_to_result, rel=0.3), batch
