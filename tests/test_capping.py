"""Capping and best-first order: the rules by hand, the cell record, and whole studies with real ranks
whose answers must not move (capping on or off, alone, packed, fused, sharded, resumed)."""
import json
import multiprocessing

import numpy as np
import pytest

from hvd_sparse.aggregate import read_trials, study_table
from hvd_sparse.capping import Bound, CellRecord, Ended, best, best_first, capped_at, log_name
from hvd_sparse.config import ConfigError
from hvd_sparse.log import TrialLog, read_log
from hvd_sparse.study import StudySpec, prepare_dir
from conftest import describe
from test_study import SPEC, logs_of, run_study

# -- the rules ------------------------------------------------------------------------------------


def test_a_trial_is_capped_at_or_past_the_bound_unless_it_reached_the_goal_there():
    bound = Bound(100, 3)
    assert not capped_at(75, False, bound)  # below the bound: it may still beat it
    assert capped_at(100, False, bound) and capped_at(125, False, bound)
    assert not capped_at(100, True, bound)  # a goal reached exactly at the bound still counts (a tie)
    assert not capped_at(10**6, False, None)  # no trial of the cell has reached the goal yet


def test_the_best_is_the_fewest_steps_then_the_lowest_trial_id():
    ended = {0: Ended("INCOMPLETE", None, "a"), 1: Ended("COMPLETE", 200, "b"), 2: Ended("COMPLETE", 150, "c"),
             3: Ended("COMPLETE", 150, "d"), 4: Ended("CAPPED", None, "e"), 5: Ended("INFEASIBLE", None, "f")}
    assert best(ended) == Bound(150, 2)
    assert best({0: Ended("INCOMPLETE", None, "a")}) is None


@pytest.mark.parametrize("neighbours, first", [
    ({}, None),  # nothing measured: trial order
    ({16: None, 64: None}, None),  # measured, but no trial reached the goal there
    ({16: Bound(300, 2), 64: Bound(90, 4)}, 2),  # 16 and 64 equally near 32 (log scale): the smaller
    ({8: Bound(300, 1), 64: Bound(90, 4)}, 4),  # 64 is one doubling away, 8 two
    ({64: Bound(90, 9)}, None),  # its best trial is not among these: trial order
])
def test_best_first_takes_the_best_trial_of_the_nearest_measured_batch_size(neighbours, first):
    order = best_first([0, 1, 2, 3, 4], 32, neighbours)
    assert sorted(order) == [0, 1, 2, 3, 4]
    assert order == ([first] if first is not None else []) + [t for t in range(5) if t != first]


# -- the cell record ------------------------------------------------------------------------------


def touch_logs(folder, *trial_ids):
    folder.mkdir(parents=True, exist_ok=True)
    for t in trial_ids:
        (folder / log_name(t)).write_bytes(b"")


def test_the_cell_record_is_shared_through_its_file(tmp_path):
    hashes = {0: "h0", 1: "h1", 2: "h2"}
    touch_logs(tmp_path, 0, 1, 2)
    mine, theirs = CellRecord(tmp_path, hashes), CellRecord(tmp_path, hashes)
    mine.record(0, "INCOMPLETE", None)
    assert theirs.bound() is None
    mine.record(1, "COMPLETE", 300)
    assert theirs.bound() == Bound(300, 1)  # another process (a packed group, a shard, a resume) sees it
    theirs.record(2, "COMPLETE", 250)
    assert mine.bound() == Bound(250, 2)
    saved = json.loads((tmp_path / "cell.json").read_text())
    assert set(saved["trials"]) == {"0", "1", "2"}


def test_entries_that_cannot_be_believed_are_not(tmp_path, caplog):
    touch_logs(tmp_path, 0, 1)
    CellRecord(tmp_path, {0: "h0", 1: "h1", 2: "h2"}).record(0, "COMPLETE", 100)
    assert CellRecord(tmp_path, {0: "other", 1: "h1"}).bound() is None  # another trial's run hash
    (tmp_path / log_name(0)).unlink()
    assert CellRecord(tmp_path, {0: "h0", 1: "h1"}).bound() is None  # its log is gone
    touch_logs(tmp_path, 0)
    assert CellRecord(tmp_path, {0: "h0", 1: "h1"}).bound() == Bound(100, 0)
    path = tmp_path / "cell.json"
    path.write_text(path.read_text().replace('"steps_to_result": 100', '"steps_to_result": 10'))  # a flipped digit
    assert CellRecord(tmp_path, {0: "h0", 1: "h1"}).bound() is None
    assert "not used for capping (checksum)" in caplog.text
    path.write_text("{not json")
    assert CellRecord(tmp_path, {0: "h0", 1: "h1"}).bound() is None
    record = CellRecord(tmp_path, {0: "h0", 1: "h1"})
    record.record(1, "COMPLETE", 200)  # a damaged file is replaced by what this process knows
    assert CellRecord(tmp_path, {0: "h0", 1: "h1"}).bound() == Bound(200, 1)


def _record_many(folder, first):
    record = CellRecord(folder, {t: f"h{t}" for t in range(40)})
    for t in range(first, 40, 2):
        record.record(t, "COMPLETE", 1000 - t)


def test_two_processes_recording_at_once_lose_no_entry(tmp_path):
    touch_logs(tmp_path, *range(40))
    procs = [multiprocessing.get_context("fork").Process(target=_record_many, args=(tmp_path, i)) for i in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0]
    assert set(CellRecord(tmp_path, {t: f"h{t}" for t in range(40)}).read()) == set(range(40))


# -- the spec -------------------------------------------------------------------------------------


def test_capping_is_kept_out_of_the_study_identity(tmp_path):
    on, off = StudySpec.from_dict(SPEC), StudySpec.from_dict({**SPEC, "capping": False})
    assert on.capping and not off.capping and on.study_hash() == off.study_hash()
    directory = tmp_path / "study"
    prepare_dir(off, directory)
    prepare_dir(on, directory)  # the same study: capped and uncapped logs live in one directory
    saved = json.loads((directory / "study.json").read_text())
    del saved["spec"]["capping"]  # a study.json written before capping existed
    (directory / "study.json").write_text(json.dumps(saved))
    prepare_dir(on, directory)
    with pytest.raises(ConfigError, match="capping must be true or false"):
        StudySpec.from_dict({**SPEC, "capping": "yes"})


# -- the aggregator -------------------------------------------------------------------------------


def test_the_tables_count_capped_trials_apart(tmp_path):
    from test_aggregate import write_log

    for trial_id, status, steps in ((0, "INCOMPLETE", None), (1, "COMPLETE", 50), (2, "COMPLETE", 40)):
        write_log(tmp_path, "sgd", 0.0, 16, trial_id, status, steps)
    capped = write_log(tmp_path, "sgd", 0.0, 16, 3, "RUNNING", None)
    TrialLog(capped).finish("CAPPED", None, capping_bound=40, capped_by=2)
    trials, _ = read_trials(tmp_path)
    row = study_table(trials).iloc[0]
    assert (row.trials, row.complete, row.incomplete, row.capped, row.capped_elsewhere) == (4, 2, 1, 1, 0)
    assert (row.steps_to_result, row.best_trial) == (40, 2)
    assert trials.set_index("trial_id").loc[3, ["capping_bound", "capped_by"]].tolist() == [40, 2]
    first = study_table(trials, max_trials=2).iloc[0]  # trials 0 and 1 only: nothing capped among them
    assert (first.capped, first.capped_elsewhere, first.steps_to_result) == (0, 0, 50)
    # trial 3 without trial 2: its bound came from a trial not counted, so the answer is an upper bound
    subset = trials[trials.trial_id != 2]
    assert study_table(subset).iloc[0].capped_elsewhere == 1


# -- whole studies with real ranks ----------------------------------------------------------------

# goal error 0.17 on the synthetic data: at batch 16 trial 2 reaches it first (step 75), after trials 0 and
# 1 ran their whole budget; at batch 32 four trials reach it (25 to 75 steps) and two do not
CAP_SPEC = {**SPEC, "name": "capping", "sparsities": [0.8], "optimizers": ["nesterov"], "batch_sizes": [16, 32],
            "trials": 6, "goal_error": 0.17, "max_steps": 300, "eval_every": 25}


def write_cap_spec(tmp_path, **changes):
    path = tmp_path / "capping.json"
    path.write_text(json.dumps({**CAP_SPEC, **changes}))
    return path


def by_trial(root):
    directory, logs = logs_of(root)
    return {p.relative_to(directory): read_log(p) for p in logs}


def answers(root):
    trials, _ = read_trials(root)
    return study_table(trials)[["batch_size", "steps_to_result", "best_trial"]].values.tolist()


@pytest.fixture(scope="module")
def uncapped(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uncapped")
    proc = run_study(1, write_cap_spec(tmp), tmp / "runs", "--no-capping")
    assert proc.returncode == 0, describe(proc)
    assert "CAPPED" not in proc.stdout
    return tmp / "runs"


def assert_capping_kept_the_answer(uncapped_root, capped_root, at_once=True):
    """Same steps-to-result and best trial per cell; every trial that did not stop as CAPPED measured
    exactly what it measured uncapped, and each CAPPED one is a prefix of its uncapped run that stops at
    or past its cell's bound, a bound some other trial of the cell really set; ``at_once``: at its first
    evaluation past it (trials that run side by side see a bound only once the trial setting it ended)."""
    assert answers(capped_root) == answers(uncapped_root)
    full, capped = by_trial(uncapped_root), by_trial(capped_root)
    assert full.keys() == capped.keys()
    n_capped = 0
    for path, log in capped.items():
        ref = full[path].measurements
        m = {k: v for k, v in log.measurements.items() if k != "wall_time"}
        if log.status != "CAPPED":
            assert log.status == full[path].status and log.steps_to_result == full[path].steps_to_result, path
            for column, values in m.items():
                np.testing.assert_array_equal(values, ref[column], err_msg=f"{path}: {column}")
            continue
        n_capped += 1
        bound, by = int(log.attrs["capping_bound"]), int(log.attrs["capped_by"])
        setter = capped[path.with_name(log_name(by))]
        assert setter.status == "COMPLETE" and setter.steps_to_result == bound, path
        steps = list(m["step"])
        assert steps[-1] >= bound and (not at_once or all(s < bound for s in steps[:-1])), (path, steps, bound)
        for column, values in m.items():
            np.testing.assert_array_equal(values, ref[column][: len(values)], err_msg=f"{path}: {column}")
        assert full[path].status != "COMPLETE" or full[path].steps_to_result > steps[-1]
        assert log.path.with_suffix(".ckpt.pt").exists()  # kept: a study without capping resumes it
    assert n_capped >= 4, n_capped


@pytest.mark.launches
@pytest.mark.parametrize("np_, extra", [(2, ["--pack", "2"]), (1, ["--fuse", "3"])], ids=["pack2", "fuse3"])
def test_capping_keeps_every_cell_answer(uncapped, tmp_path, monkeypatch, np_, extra):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the same float sums as the reference, whatever the packing
    proc = run_study(np_, write_cap_spec(tmp_path), tmp_path / "runs", *extra)
    assert proc.returncode == 0, describe(proc)
    assert_capping_kept_the_answer(uncapped, tmp_path / "runs", at_once="--pack" not in extra)
    assert "trials CAPPED" in proc.stdout


@pytest.mark.launches
def test_the_cell_best_first_and_a_capped_study_run_without_capping_is_the_uncapped_study(uncapped, tmp_path, monkeypatch):
    """One rank alone: capping keeps every cell's answer, the best trial so far runs first, and the
    capped study rerun with --no-capping is the uncapped study."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec, root = write_cap_spec(tmp_path), tmp_path / "runs"
    capped = run_study(1, spec, root)
    assert capped.returncode == 0, describe(capped)
    assert "trials CAPPED" in capped.stdout
    assert_capping_kept_the_answer(uncapped, root)
    order = [line.split("trial=")[1].split()[0] for line in capped.stdout.splitlines() if "batch=32 trial=" in line]
    best_at_16 = int(answers(uncapped)[0][2])
    assert order[0] == str(best_at_16) and order[1:] == [str(t) for t in range(6) if t != best_at_16]
    again = run_study(1, spec, root, "--no-capping")  # resumes every CAPPED trial from its checkpoint
    assert again.returncode == 0, describe(again)
    assert again.stdout.count("(resumed,") >= 4 and "CAPPED" not in again.stdout.split("steps-to-result")[0]
    full, resumed = by_trial(uncapped), by_trial(root)
    for path, log in resumed.items():
        assert log.status == full[path].status and log.steps_to_result == full[path].steps_to_result, path
        for column, values in log.measurements.items():
            if column != "wall_time":
                np.testing.assert_array_equal(values, full[path].measurements[column], err_msg=f"{path}: {column}")
        assert "capping_bound" not in log.attrs


@pytest.mark.launches
def test_shards_and_resumes_share_the_bound_through_the_cell_record(uncapped, tmp_path, monkeypatch):
    """Shard 1 runs after shard 0 in another job: its trials see shard 0's bound only through the cell's
    record. Then a capped trial is made to look killed right after its last checkpoint (RUNNING): the
    resumed job caps it at once, at the same step."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec, root = write_cap_spec(tmp_path), tmp_path / "runs"
    for i in (0, 1):
        proc = run_study(1, spec, root, "--shard", f"{i}/2")
        assert proc.returncode == 0, describe(proc)
    assert answers(root) == answers(uncapped)
    _, logs = logs_of(root)
    shard1_capped = [p for p in logs if int(p.stem[-3:]) % 2 == 1 and read_log(p).status == "CAPPED"]
    assert shard1_capped  # capped by a bound that only shard 0's record could have given
    victim = shard1_capped[0]
    before = read_log(victim)
    TrialLog(victim)._update(lambda f: f.attrs.__setitem__("status", "RUNNING"))
    rerun = run_study(1, spec, root, "--shard", "1/2")
    assert rerun.returncode == 0, describe(rerun)
    after = read_log(victim)
    assert after.status == "CAPPED" and after.attrs["resumes"] == 1
    assert list(after.measurements["step"]) == list(before.measurements["step"])
    assert after.attrs["capping_bound"] == before.attrs["capping_bound"]


def test_a_trial_that_starts_again_is_forgotten_until_it_ends(tmp_path):
    """A log removed and made again (a damaged one, run anew) must not bound the others with its old result."""
    touch_logs(tmp_path, 0, 1)
    record = CellRecord(tmp_path, {0: "h0", 1: "h1"})
    record.record(0, "COMPLETE", 300)
    CellRecord(tmp_path, {0: "h0", 1: "h1"}).forget(0)  # another process starts trial 0 again
    assert CellRecord(tmp_path, {0: "h0", 1: "h1"}).bound() is None
    assert "0" not in json.loads((tmp_path / "cell.json").read_text())["trials"]
