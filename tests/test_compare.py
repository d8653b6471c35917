"""hvd_sparse.compare: workloads side by side from the aggregator's tables, no logs needed."""
import shutil

import pandas as pd
import pytest

from hvd_sparse.compare import comparison, main, step_ratios
from conftest import REPO

FASHION = REPO / "docs" / "fashion-study"


def test_the_sparse_over_dense_ratios_are_taken_at_equal_batch_sizes_where_both_reached():
    studies = pd.DataFrame({
        "dataset": "d", "model": "m", "optimizer": "sgd", "pruning": "snip", "schedule": "constant", "goal_error": 0.1,
        "sparsity": [0.0, 0.0, 0.0, 0.9, 0.9, 0.9],
        "batch_size": [8, 16, 32, 8, 16, 64],
        "steps_to_result": [100, 50, None, 300, 100, 40],
    })
    (row,) = step_ratios(studies).itertuples()
    # batch 8: 3.0, batch 16: 2.0; 32 (dense missed the goal) and 64 (no dense study) are left out
    assert (row.sparsity, row.ratio_median, row.ratio_min, row.ratio_max, row.ratio_batches) == (0.9, 2.5, 2.0, 3.0, 2)


def test_the_committed_fashion_tables_compare_to_what_their_readme_summary_says():
    table = comparison([FASHION]).set_index(["optimizer", "sparsity"])
    assert table.loc[("nesterov", 0.0)].critical_batch_size == 64
    assert table.loc[("sgd", 0.9)].diminishing_batch_size == 512
    # finding 2 (docs/fashion-study/index.md): Nesterov at 0.9 needs 1.4 to 3.4 times the dense steps
    row = table.loc[("nesterov", 0.9)]
    assert (round(row.ratio_min, 1), round(row.ratio_max, 1), row.ratio_batches) == (1.4, 3.4, 9)


def test_a_sparse_curve_in_another_folder_is_compared_with_the_dense_curve_of_its_workload(tmp_path):
    """The grid's dense curves in one folder, its sparse curves in another (a study of the middle sparsities
    beside the grid): the same ratios as with both in one folder."""
    for name, keep in (("dense", lambda t: t[t.sparsity == 0]), ("sparse", lambda t: t[t.sparsity > 0])):
        (tmp_path / name).mkdir()
        for table in ("studies.csv", "curves.csv", "noise_scale.csv"):
            keep(pd.read_csv(FASHION / table)).to_csv(tmp_path / name / table, index=False)
    columns = ["optimizer", "sparsity", "ratio_median", "ratio_min", "ratio_max", "ratio_batches"]
    apart = comparison([tmp_path / "dense", tmp_path / "sparse"])[columns]
    together = comparison([FASHION])[columns]
    assert apart.notna().sum().ratio_median == 4  # Nesterov at 0.5, 0.7, 0.9 and SGD at 0.9
    pd.testing.assert_frame_equal(apart, together)


def test_a_folder_without_the_tables_or_twice_the_same_workload_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"hvd_sparse.compare: error: {tmp_path}: no studies.csv or curves.csv (a folder hvd_sparse.aggregate wrote)")
    copy = tmp_path / "copy"
    shutil.copytree(FASHION, copy, ignore=shutil.ignore_patterns("*.png", "*.pdf", "*-*"))
    assert main([str(FASHION), str(copy)]) == 2
    assert "appear in two folders" in capsys.readouterr().err


def test_the_table_is_printed_and_written(tmp_path, capsys):
    assert main([str(FASHION), "--out", str(tmp_path / "c.csv")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["optimizer", "sparsity", "workload"] and len(lines) == 1 + 6
    assert len(pd.read_csv(tmp_path / "c.csv")) == 6


def test_pruning_methods_are_rows_of_their_own_a_curve_that_never_reached_the_goal_a_dash(tmp_path, capsys):
    """The pruning-methods tables: one row per method (GraSP never reached its goal); and a folder
    aggregated without the noise scale has no noise_scale.csv."""
    folder = tmp_path / "methods"
    shutil.copytree(REPO / "docs" / "fashion-study" / "pruning-methods", folder,
                    ignore=shutil.ignore_patterns("*.png", "*.pdf", "noise_scale.csv"))
    assert main([str(folder)]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [row.split()[3] for row in rows] == ["grasp", "magnitude", "random", "goal", "synflow"]  # SNIP: unnamed
    assert rows[0].split()[6:] == ["-"] * 6  # critical, maximal, steps, ratio, B_simple, its ratio
    grasp = comparison([folder]).set_index("pruning").loc["grasp"]
    assert pd.isna(grasp.steps_at_smallest) and pd.isna(grasp.noise_scale_at_goal)
