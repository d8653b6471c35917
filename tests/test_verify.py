"""hvd_sparse.verify: a rerun's tables against the committed ones (docs/mnist-study, a capped, packed
run), with the rerun's differences made by hand."""
import shutil

import pandas as pd
import pytest

from hvd_sparse.verify import format_report, main, verify
from conftest import REPO

REFERENCE = REPO / "docs" / "mnist-study"
TABLES = ("trials", "studies", "curves", "noise_scale", "critical_by_optimizer")


@pytest.fixture
def rerun(tmp_path):
    """A copy of the committed tables as a rerun would write them: other wall times and job splits."""
    folder = tmp_path / "rerun"
    folder.mkdir()
    for name in TABLES:
        shutil.copy(REFERENCE / f"{name}.csv", folder)
    trials = read(folder, "trials")
    write(folder, "trials", trials.assign(wall_time=trials.wall_time * 1.7, world_sizes="2 1"))
    return folder


def read(folder, name):
    return pd.read_csv(folder / f"{name}.csv")


def write(folder, name, table):
    table.to_csv(folder / f"{name}.csv", index=False, float_format="%.6g")


def capped_trial(trials):
    """A CAPPED trial of the reference whose study reached the goal (the row's index)."""
    return trials[(trials.status == "CAPPED") & (trials.steps_done < trials.max_steps)].index[0]


def test_a_rerun_that_differs_only_in_wall_time_and_job_split_reproduces(rerun):
    report = verify(REFERENCE, rerun)
    assert report.differences == [] and report.trials == 300 and report.studies == 100
    assert report.trials_capped == (read(REFERENCE, "trials").status == "CAPPED").sum()
    assert "reproduced" in format_report(report)
    assert main([str(REFERENCE), str(rerun)]) == 0


@pytest.mark.parametrize("column, value", [("best_val_error", 0.0401), ("steps_to_result", 900), ("lr", 0.02),
                                           ("noise_at_result", 1.5)])
def test_an_uncapped_trial_that_measured_otherwise_is_a_difference(rerun, column, value):
    trials = read(rerun, "trials")
    row = trials[(trials.status == "COMPLETE")].index[3]
    trials.loc[row, column] = value
    write(rerun, "trials", trials)
    report = verify(REFERENCE, rerun)
    assert len(report.differences) == 1 and column in report.differences[0], report.differences
    assert main([str(REFERENCE), str(rerun)]) == 1


def test_a_trial_capped_in_one_run_and_complete_later_in_the_other_agrees(rerun):
    """Packed groups see a bound when its trial has ended: here the trial ran on past the step where the
    reference capped it and reached the goal later, with a lower best error; the study counts it as
    complete instead of capped, its answer unchanged."""
    trials, studies = read(rerun, "trials"), read(rerun, "studies")
    row = capped_trial(trials)
    t = trials.loc[row]
    cell = (studies.optimizer == t.optimizer) & (studies.sparsity == t.sparsity) & (studies.batch_size == t.batch_size)
    lowest = float(studies.loc[cell, "best_val_error"].iloc[0]) - 0.001  # now the lowest of its study's trials
    trials.loc[row, ["status", "steps_to_result", "steps_done", "best_val_error", "capping_bound", "capped_by"]] = [
        "COMPLETE", t.steps_done + 100, t.steps_done + 100, lowest, -1, -1]
    write(rerun, "trials", trials)
    studies.loc[cell, ["complete", "capped", "best_val_error"]] = [studies.loc[cell, "complete"].iloc[0] + 1,
                                                                  studies.loc[cell, "capped"].iloc[0] - 1, lowest]
    write(rerun, "studies", studies)
    report = verify(REFERENCE, rerun)
    assert report.differences == [] and report.studies_counts == 1


def test_a_trial_capped_where_the_other_run_ended_it_at_the_budget_agrees(rerun):
    """Its last evaluation met the bound in one run (CAPPED), came before the bound existed in the other
    (INCOMPLETE): the same evaluations."""
    trials = read(rerun, "trials")
    row = trials[(trials.status == "INCOMPLETE")].index[0]
    trials.loc[row, ["status", "capping_bound", "capped_by"]] = ["CAPPED", trials.loc[row, "steps_done"], 0]
    write(rerun, "trials", trials)
    assert verify(REFERENCE, rerun).differences == []


@pytest.mark.parametrize("change, message", [
    ("goal reached before the cap", "reached the goal at step"),
    ("evaluations differ", "not the same evaluations"),
    ("went on past its own end", "ended COMPLETE at step"),
    ("capped where it reached the goal", "stopped at step"),
    ("another learning rate", "lr"),
])
def test_a_capped_trial_whose_runs_cannot_be_one_sequence_of_evaluations_is_a_difference(rerun, change, message):
    trials = read(rerun, "trials")
    row = capped_trial(trials)
    t = trials.loc[row]
    if change == "goal reached before the cap":
        trials.loc[row, ["status", "steps_to_result", "steps_done"]] = ["COMPLETE", t.steps_done, t.steps_done + 100]
    elif change == "evaluations differ":  # ran further, yet its best error so far is worse than where it was capped
        trials.loc[row, ["steps_done", "best_val_error"]] = [t.steps_done + 100, t.best_val_error + 0.01]
    elif change == "another learning rate":
        trials.loc[row, "lr"] = t.lr * 2
    else:  # a trial COMPLETE in the reference (not its study's best) ...
        row = trials[(trials.status == "COMPLETE")].index[0]
        t = trials.loc[row]
        if change == "went on past its own end":  # ... CAPPED here after the step where it reached the goal
            trials.loc[row, ["status", "steps_done"]] = ["CAPPED", t.steps_done + 100]
        else:  # ... CAPPED here at that very step
            trials.loc[row, "status"] = "CAPPED"
    write(rerun, "trials", trials)
    report = verify(REFERENCE, rerun)
    assert len(report.differences) == 1 and message in report.differences[0], report.differences


@pytest.mark.parametrize("table, column, value", [("studies", "steps_to_result", 1), ("studies", "best_trial", 7),
                                                  ("studies", "complete", 99), ("studies", "best_val_error", 0.001),
                                                  ("curves", "critical_batch_size", 4096),
                                                  ("noise_scale", "noise_scale_at_goal", 1.0),
                                                  ("critical_by_optimizer", "sgd", 4096)])
def test_a_changed_answer_curve_or_table_is_a_difference(rerun, table, column, value):
    """The counts of how trials ended, and the lowest error, may move only with a CAPPED trial that ran
    otherwise: here every trial is as committed, so a changed count is a difference too."""
    frame = read(rerun, table)
    frame.loc[frame.index[len(frame) // 2], column] = value
    write(rerun, table, frame)
    report = verify(REFERENCE, rerun)
    assert any(table in d and column in d for d in report.differences), report.differences


def test_a_rerun_of_one_study_is_compared_on_that_study_alone(rerun):
    """A single study folder aggregated alone: paths without the study directory, only its rows."""
    for name in TABLES:
        frame = read(rerun, name)
        if name == "trials":
            frame = frame[frame.study == "mnist-sgd"]
            frame = frame.assign(path=frame.path.str.split("/", n=1).str[1])
        elif "optimizer" in frame:
            frame = frame[frame.optimizer == "sgd"]
        else:
            frame = frame.drop(columns=["momentum", "nesterov"])
        write(rerun, name, frame)
    report = verify(REFERENCE, rerun)
    assert report.differences == [] and report.trials == 96 and report.studies == 32


def test_a_reference_written_before_the_pruning_method_was_a_column_is_read_as_snip(rerun, tmp_path):
    reference = tmp_path / "reference"
    reference.mkdir()
    for name in TABLES:
        write(reference, name, read(REFERENCE, name).drop(columns=["pruning"]))
    assert verify(reference, rerun).differences == []


def test_trials_missing_or_extra_or_still_running_are_differences(rerun):
    trials = read(rerun, "trials")
    extra = trials.iloc[[0]].assign(path=trials.path[0].replace("trial-000", "trial-009"), trial_id=9)
    trials.loc[1, "status"] = "RUNNING"
    write(rerun, "trials", pd.concat([trials.drop(index=2), extra]))
    found = verify(REFERENCE, rerun).differences
    assert len(found) == 3, found
    assert any("trial-002.h5: in the reference, not in the rerun" in d for d in found)
    assert any("trial-009.h5: in the rerun, not in the reference" in d for d in found)
    assert any("trial-001.h5: still RUNNING" in d for d in found)


def test_a_folder_without_tables_is_a_one_line_error(tmp_path, capsys):
    assert main([str(REFERENCE), str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no trials.csv" in err[0]


def test_other_cpu_kernels_are_said(rerun, tmp_path, capsys):
    reference = tmp_path / "reference"
    shutil.copytree(REFERENCE, reference, ignore=shutil.ignore_patterns("*.pdf", "*.png", "lipschitz"))
    (reference / "cpu_capability.txt").write_text("NO_SUCH_KERNELS\n")
    assert main([str(reference), str(rerun)]) == 0
    assert "the reference ran on NO_SUCH_KERNELS kernels" in capsys.readouterr().err
