"""The Fashion-MNIST replication's specs (studies/fashion-mnist-*.yaml): they validate, the side studies
are what their comments say they are, and a two-cell slice of the grid runs on the real data."""
import json
import math
from pathlib import Path

import pandas as pd
import pytest

from hvd_sparse.data import SYSTEM_DATA_DIRS
from hvd_sparse.log import read_log
from hvd_sparse.study import StudySpec, grid
from conftest import REPO, describe, horovodrun

STUDIES = REPO / "studies"
FIGURES = REPO / "docs" / "fashion-study"


def load(name):
    return StudySpec.load(STUDIES / f"fashion-mnist-{name}.yaml")


def by_cell(spec):
    return {(t.optimizer, t.sparsity, t.batch_size, t.trial_id): t.config.to_dict() for t in grid(spec)}


def test_the_grid_specs_validate_and_cover_the_paper_grid():
    nesterov, sgd = load("nesterov"), load("sgd")
    assert nesterov.sparsities == (0.0, 0.5, 0.7, 0.9) and sgd.sparsities == (0.0, 0.9)
    for spec in (nesterov, sgd):
        assert spec.batch_sizes == tuple(2 ** k for k in range(3, 11)) and spec.dataset == "fashion-mnist"
        assert spec.data_dir is None  # read from where the Debian package puts it
    assert len(grid(nesterov)) == 4 * 8 * 4 and len(grid(sgd)) == 2 * 8 * 4


def test_the_stability_study_starts_with_the_main_studys_trials():
    """Its trials 0-3 are the main grid's (same points, seeds, budgets); 4-7 are new points."""
    main, stability = by_cell(load("nesterov")), by_cell(load("stability"))
    assert len(stability) == 2 * 3 * 8
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
        assert cfg["train"].pop("lipschitz_every") == 100 and twin["train"].pop("lipschitz_every") == 0
        assert cfg == twin
