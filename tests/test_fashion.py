"""The Fashion-MNIST replication's specs (studies/fashion-mnist-*.yaml): they validate, the side studies
are what their comments say they are, and a two-cell slice of the grid runs on the real data."""
import pandas as pd
import pytest

from hvd_sparse.data import SYSTEM_DATA_DIRS
from hvd_sparse.log import read_log
from hvd_sparse.study import StudySpec, grid
from conftest import REPO, describe, mpirun, spec_slice

STUDIES = REPO / "studies"
FIGURES = REPO / "docs" / "fashion-study"


def load(name):
    return StudySpec.load(STUDIES / f"fashion-mnist-{name}.yaml")


def by_cell(spec):
    return {(t.optimizer, t.sparsity, t.batch_size, t.trial_id): t.config.to_dict() for t in grid(spec)}


def test_the_grid_specs_validate_and_cover_the_paper_grid():
    nesterov, sgd = load("nesterov"), load("sgd")
    assert nesterov.sparsities == (0.0, 0.5, 0.7, 0.9) and sgd.sparsities == (0.0, 0.9)
    assert nesterov.batch_sizes == sgd.batch_sizes == tuple(2 ** k for k in range(3, 12))
    for spec in (nesterov, sgd):
        assert spec.dataset == "fashion-mnist" and spec.data_dir is None  # read from where Debian puts it
    assert len(grid(nesterov)) == 4 * 9 * 4 and len(grid(sgd)) == 2 * 9 * 4


def test_the_stability_study_starts_with_the_main_studys_trials():
    """Its trials 0-3 are the main grid's (same points, seeds, budgets); 4-7 are new points."""
    main, stability = by_cell(load("nesterov")), by_cell(load("stability"))
    assert len(stability) == 2 * 1 * 8
    for (optimizer, sparsity, batch, trial), cfg in stability.items():
        if trial < 4:
            assert cfg == main[(optimizer, sparsity, batch, trial)]
        else:
            assert all(cfg["optim"]["lr"] != main[(optimizer, sparsity, batch, t)]["optim"]["lr"] for t in range(4))


def test_the_lipschitz_study_is_main_trial_1_at_batch_128_measured():
    main, lipschitz = by_cell(load("nesterov")), by_cell(load("lipschitz"))
    assert sorted(s for _, s, _, _ in lipschitz) == [0.0, 0.5, 0.7, 0.9]
    for (optimizer, sparsity, batch, _), cfg in lipschitz.items():
        twin = main[(optimizer, sparsity, 128, 1)]
        assert cfg["train"].pop("lipschitz_every") == 150 and twin["train"].pop("lipschitz_every") == 0
        assert cfg == twin


def two_cell_slice(tmp_path):
    """studies/fashion-mnist-nesterov.yaml cut to two cells (sparsity 0, batch sizes 64 and 128) and
    their first trial; everything else as in the spec."""
    return spec_slice(STUDIES / "fashion-mnist-nesterov.yaml", tmp_path, "fashion-slice", sparsities=[0.0],
                      batch_sizes=[64, 128], trials=1)


@pytest.mark.launches
def test_a_two_cell_slice_runs_on_the_real_data_and_agrees_with_the_committed_tables(tmp_path):
    """The real Fashion-MNIST (set-up installs it), two trials side by side (np=2 --pack 2), as
    `make replicate-fashion` runs them; each ends as the committed trials.csv says, its steps-to-result
    within 30% (another CPU may sum floats in another order; on this machine they are equal)."""
    if not (SYSTEM_DATA_DIRS["FashionMNIST"][0] / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed (launch/setup.sh installs it where it has root and apt)")
    out = tmp_path / "runs"
    proc = mpirun(2, ["-m", "hvd_sparse.study", str(two_cell_slice(tmp_path)), "--out", str(out), "--pack", "2"],
                      timeout=110)
    assert proc.returncode == 0, describe(proc)
    committed = pd.read_csv(FIGURES / "trials.csv")
    for log_path in sorted(out.rglob("trial-*.h5")):
        log = read_log(log_path, with_mask=False)
        batch = log.config["train"]["batch_size"]
        (row,) = committed[(committed.optimizer == "nesterov") & (committed.sparsity == 0.0)
                           & (committed.batch_size == batch) & (committed.trial_id == 0)].itertuples()
        assert log.status == row.status, (batch, log.status, row.status)
        if row.status == "COMPLETE":
            assert log.steps_to_result == pytest.approx(row.steps_to_result, rel=0.3), (batch, log.steps_to_result)
