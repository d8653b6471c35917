"""What happens when things go wrong, with real ranks (np=2) and hard timeouts.

Each test here backs an entry of the troubleshooting page (docs/troubleshooting.md); the others are
named there too (test_train, test_checkpoint, test_study, test_log, test_aggregate, test_slurm).
Every test records the job's time to exit (``record_property``): `make failure-times` prints them.
"""
import json
import shutil
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from hvd_sparse.checkpoint import checkpoint_path
from hvd_sparse.log import read_log
from conftest import REPO, describe, fill_disk, launch_env, mpirun, mpirun_cmd, rank_lines
from test_data import write_mnist

TRAIN = ["-m", "hvd_sparse.train", "--no-progress", "--dataset", "synthetic", "--model", "mlp-tiny",
         "--batch-size", "32", "--max-steps", "20", "--eval-every", "10"]
PER_RANK = str(REPO / "tests" / "rank_programs" / "per_rank_args.py")
TINY_STUDY = {"name": "s", "dataset": "synthetic", "model": "mlp-tiny", "sparsities": [0.5], "optimizers": ["sgd"],
              "batch_sizes": [16], "trials": 1, "goal_error": 0.0, "max_steps": 10, "eval_every": 5}
LIMIT = 30  # seconds from launch to the exit of every rank, the launcher's own start-up included


@pytest.fixture(scope="module")
def ended_study(tmp_path_factory):
    """TINY_STUDY with two trials, ended at np=2: (its spec, its --out folder). Tests damage a copy."""
    root = tmp_path_factory.mktemp("ended-study")
    spec = root / "spec.yaml"
    spec.write_text(json.dumps({**TINY_STUDY, "trials": 2}))
    proc = mpirun(2, ["-m", "hvd_sparse.study", str(spec), "--out", str(root / "runs")], timeout=120)
    assert proc.returncode == 0, describe(proc)
    return spec, root / "runs"


def assert_every_rank_failed(proc, started, message, record_property, prog="hvd_sparse.train"):
    """Non-zero exit, exactly one error line naming ``message`` on each rank, within LIMIT seconds."""
    elapsed = time.time() - started
    record_property("time_to_exit_s", round(elapsed, 1))
    assert proc.returncode != 0, describe(proc)
    for rank in (0, 1):
        expected = message[rank] if isinstance(message, dict) else message
        errors = [line for line in rank_lines(proc.stdout + proc.stderr, rank) if f"{prog}: error:" in line]
        assert len(errors) == 1 and expected in errors[0], describe(proc)
    assert "Traceback" not in proc.stdout + proc.stderr, describe(proc)
    assert elapsed < LIMIT, f"{elapsed:.1f} s"


def per_rank(module, extra_for_rank_1, args, timeout=LIMIT * 2):
    """``module``'s main on both ranks, rank 1 with ``extra_for_rank_1`` appended to its arguments."""
    return mpirun(2, [PER_RANK, module, json.dumps({"1": extra_for_rank_1}), *args], timeout=timeout)


# -- ranks that disagree -----------------------------------------------------------------------------


@pytest.mark.launches
def test_ranks_given_different_arguments_stop_together(tmp_path, record_property):
    started = time.time()
    proc = per_rank("hvd_sparse.train", ["--lr", "0.2"], [*TRAIN[2:], "--lr", "0.1", "--out", str(tmp_path)])
    assert_every_rank_failed(proc, started, "ranks disagree on the configuration", record_property)
    assert not list(tmp_path.rglob("*.h5"))


@pytest.mark.launches
def test_ranks_reading_different_data_stop_together(tmp_path, record_property):
    write_mnist(tmp_path / "node-a", n_train=200, n_test=20)
    stale = tmp_path / "node-b"
    shutil.copytree(tmp_path / "node-a", stale)
    images = stale / "train-images-idx3-ubyte"
    raw = bytearray(images.read_bytes())
    raw[-1] ^= 0xFF  # one pixel of one image differs on rank 1's node
    images.write_bytes(bytes(raw))
    args = ["--no-progress", "--dataset", "mnist", "--model", "mlp-tiny", "--batch-size", "32", "--max-steps", "5",
            "--data-dir", str(tmp_path / "node-a"), "--out", str(tmp_path / "out")]
    started = time.time()
    proc = per_rank("hvd_sparse.train", ["--data-dir", str(stale)], args)
    assert_every_rank_failed(proc, started, "ranks disagree on the mnist data", record_property)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.h5"))


@pytest.mark.launches
def test_a_study_whose_ranks_run_different_shards_stops_together(tmp_path, record_property):
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps(TINY_STUDY))
    started = time.time()
    proc = per_rank("hvd_sparse.study", ["--shard", "1/2"], [str(spec), "--out", str(tmp_path / "runs")])
    assert_every_rank_failed(proc, started, "ranks disagree on the study spec, shard, --pack, --fuse, --capping and plug-ins", record_property,
                             prog="hvd_sparse.study")
    assert not list(tmp_path.rglob("*.h5"))


@pytest.mark.launches
def test_a_bad_argument_on_one_rank_only_ends_the_job(tmp_path, record_property):
    """Rank 1 fails before its first collective, outside any agreement: rank 0 learns it from Horovod."""
    started = time.time()
    proc = per_rank("hvd_sparse.train", ["--batch-size", "x"], [*TRAIN[2:], "--out", str(tmp_path)])
    assert_every_rank_failed(proc, started, {0: "another rank failed or left the job",
                                             1: "argument --batch-size: invalid int value: 'x'"}, record_property)
    assert not list(tmp_path.rglob("*.h5"))


# -- bad data and unwritable folders ---------------------------------------------------------------


@pytest.mark.launches
@pytest.mark.parametrize("damage, message", [
    ("truncate", "bytes, expected"),
    ("labels", "labels must be in 0..9"),
    ("missing", "file not found"),
])
def test_malformed_data_fails_on_every_rank(tmp_path, record_property, damage, message):
    write_mnist(tmp_path / "data", n_train=60, n_test=10)
    images, labels = tmp_path / "data" / "train-images-idx3-ubyte", tmp_path / "data" / "t10k-labels-idx1-ubyte"
    if damage == "truncate":
        images.write_bytes(images.read_bytes()[:-100])  # a download cut short
    elif damage == "labels":
        labels.write_bytes(labels.read_bytes()[:-1] + b"\x0c")
    else:
        labels.unlink()
    started = time.time()
    proc = mpirun(2, [*TRAIN, "--dataset", "mnist", "--data-dir", str(tmp_path / "data"),
                          "--out", str(tmp_path / "out")], timeout=LIMIT * 2)
    assert_every_rank_failed(proc, started, message, record_property)


@pytest.mark.launches
@pytest.mark.parametrize("program", ["train", "study"])
def test_a_read_only_output_folder_fails_before_training(tmp_path, mount_tmpfs, record_property, program):
    read_only = mount_tmpfs("ro,size=1m")
    if program == "train":
        args, prog = [*TRAIN, "--out", str(read_only / "runs")], "hvd_sparse.train"
    else:
        spec = tmp_path / "spec.yaml"
        spec.write_text(json.dumps(TINY_STUDY))
        args, prog = ["-m", "hvd_sparse.study", str(spec), "--out", str(read_only / "runs")], "hvd_sparse.study"
    started = time.time()
    proc = mpirun(2, args, timeout=LIMIT * 2)
    assert_every_rank_failed(proc, started, "Read-only file system", record_property, prog=prog)


@pytest.mark.launches
def test_an_existing_study_folder_made_read_only_fails_before_training(ended_study, mount_tmpfs, record_property):
    spec, runs = ended_study
    disk = mount_tmpfs("size=1m")
    shutil.copytree(runs, disk, dirs_exist_ok=True)
    log = sorted(disk.rglob("trial-*.h5"))[0]
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    before = log.read_bytes()
    started = time.time()
    proc = mpirun(2, ["-m", "hvd_sparse.study", str(spec), "--out", str(disk)], timeout=LIMIT * 2)
    assert_every_rank_failed(proc, started, "study directory", record_property, prog="hvd_sparse.study")
    assert "cannot write there: Read-only file system" in proc.stdout + proc.stderr
    assert log.read_bytes() == before


# -- a disk that fills up during training --------------------------------------------------------


@pytest.mark.launches
def test_a_full_disk_mid_training_stops_every_rank_and_the_run_resumes_once_there_is_room(
        tmp_path, mount_tmpfs, record_property):
    disk = mount_tmpfs("size=8m")
    args = [*TRAIN, "--model", "simple-cnn", "--max-steps", "600", "--eval-every", "20", "--goal-error", "0",
            "--out", str(disk)]
    cmd = [*mpirun_cmd(2), sys.executable, *args]
    job = subprocess.Popen(cmd, env=launch_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            logs = list(disk.glob("*.h5"))
            if logs and checkpoint_path(logs[0]).exists() and len(read_log(logs[0]).measurements["step"]) >= 3:
                break
            assert job.poll() is None, job.communicate()[0]
            time.sleep(0.05)
        filler = fill_disk(disk)
        started = time.time()
        out, _ = job.communicate(timeout=LIMIT * 2)
    finally:
        if job.poll() is None:
            job.kill()
    elapsed = time.time() - started
    record_property("time_to_exit_s", round(elapsed, 1))
    assert job.returncode == 1, out
    for rank in (0, 1):
        errors = [line for line in rank_lines(out, rank) if "hvd_sparse.train: error:" in line]
        assert len(errors) == 1 and "No space left on device" in errors[0], out
    assert "Traceback" not in out and elapsed < LIMIT, out
    (log,) = disk.glob("*.h5")
    data = read_log(log)
    assert data.status == "RUNNING" and len(data.measurements["step"]) >= 3  # every evaluation that reached the disk
    assert checkpoint_path(log).exists() and not list(disk.glob("*.tmp"))

    filler.unlink()  # room again: the same command resumes from the last checkpoint and ends
    resumed = subprocess.run(cmd, env=launch_env(), cwd=REPO, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, describe(resumed)
    data = read_log(log)
    assert data.status == "INCOMPLETE" and data.attrs["resumes"] == 1
    np.testing.assert_array_equal(data.measurements["step"], np.arange(0, 601, 20))


# -- a corrupt log in a study ----------------------------------------------------------------------


@pytest.mark.launches
def test_a_corrupt_log_in_a_study_stops_it_on_every_rank_and_is_left_alone(ended_study, tmp_path, record_property):
    spec, runs = ended_study
    shutil.copytree(runs, tmp_path / "runs")
    args = ["-m", "hvd_sparse.study", str(spec), "--out", str(tmp_path / "runs")]
    logs = sorted((tmp_path / "runs").rglob("trial-*.h5"))
    logs[1].write_bytes(logs[1].read_bytes()[:2000])  # e.g. a copy cut short
    before = {p: p.read_bytes() for p in logs}
    started = time.time()
    proc = mpirun(2, args, timeout=LIMIT * 2)
    assert_every_rank_failed(proc, started, "unreadable or corrupt HDF5 log", record_property, prog="hvd_sparse.study")
    assert str(logs[1]) in proc.stdout + proc.stderr
    assert {p: p.read_bytes() for p in logs} == before


@pytest.mark.launches
def test_an_input_error_seen_by_rank_0_alone_exits_2_on_every_rank(tmp_path):
    """Running a finished trial again: only rank 0 reads the log (LogError, an input error); rank 1
    learns it through the agreement and must exit with the same code, 2, not 1."""
    flags = ["-m", "hvd_sparse.train", "--no-progress", "--dataset", "synthetic", "--model", "mlp-tiny",
             "--batch-size", "32", "--max-steps", "10", "--eval-every", "10", "--out", str(tmp_path / "runs")]
    assert mpirun(2, flags).returncode == 0
    codes = tmp_path / "codes"
    codes.mkdir()
    script = f'"{sys.executable}" "$@"; code=$?; echo $code > "{codes}/rank$OMPI_COMM_WORLD_RANK"; exit $code'
    proc = subprocess.run([*mpirun_cmd(2), "bash", "-c", script, "rank", *flags],
                          env=launch_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, describe(proc)
    for rank in (0, 1):
        assert (codes / f"rank{rank}").read_text().strip() == "2", describe(proc)
    assert "already ended (INCOMPLETE)" in rank_lines(proc.stderr, 0)[-1]
    assert "failed on rank 0: LogError" in rank_lines(proc.stderr, 1)[-1]


# -- damaged bytes, and results that belong elsewhere ----------------------------------------------


@pytest.mark.launches
@pytest.mark.parametrize("damage", ["log byte", "another trial's log"])
def test_a_study_never_believes_a_damaged_or_foreign_log(ended_study, tmp_path, record_property, damage):
    """One byte of a finished trial's log flipped, or the log replaced by another trial's (sound bytes,
    a copy gone astray): the rerun stops before running anything, one line on every rank naming the
    file, which is left alone."""
    spec, runs = ended_study
    shutil.copytree(runs, tmp_path / "runs")
    args = ["-m", "hvd_sparse.study", str(spec), "--out", str(tmp_path / "runs")]
    logs = sorted((tmp_path / "runs").rglob("trial-*.h5"))
    if damage == "log byte":
        data = bytearray(logs[1].read_bytes())
        data[len(data) // 2] ^= 0x04
        logs[1].write_bytes(bytes(data))
        message = "it fails its checksum"
    else:
        logs[1].write_bytes(logs[0].read_bytes())
        message = "belongs to another study or trial (its trial_id, run_hash differ)"
    before = {p: p.read_bytes() for p in logs}
    started = time.time()
    proc = mpirun(2, args, timeout=LIMIT * 2)
    assert_every_rank_failed(proc, started, message, record_property, prog="hvd_sparse.study")
    assert str(logs[1]) in proc.stdout + proc.stderr and proc.returncode == 2
    assert {p: p.read_bytes() for p in logs} == before


@pytest.mark.launches
def test_a_damaged_checkpoint_is_never_resumed_from(tmp_path, record_property):
    flags = TRAIN[:-4] + ["--max-steps", "100000", "--eval-every", "10", "--goal-error", "0", "--out", str(tmp_path / "runs")]
    job = subprocess.Popen([*mpirun_cmd(2), sys.executable, *flags], env=launch_env(), cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not list((tmp_path / "runs").glob("*.ckpt.pt")) and time.time() < deadline:
        time.sleep(0.05)
    import os
    import signal as signal_
    os.killpg(job.pid, signal_.SIGKILL)  # a crash: the log says RUNNING, the checkpoint waits
    job.communicate(timeout=60)
    while any(str(tmp_path) in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])):
        time.sleep(0.1)  # the ranks see their launcher gone and stop (checkpointing once more) within seconds
    (ckpt,) = (tmp_path / "runs").glob("*.ckpt.pt")
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0x01
    ckpt.write_bytes(bytes(data))
    started = time.time()
    proc = mpirun(2, flags, timeout=LIMIT * 2)
    assert_every_rank_failed(proc, started, "the checkpoint fails its checksum (damaged bytes), so it is not used",
                             record_property)
    assert proc.returncode == 2


# A plug-in model that fails in the group of world rank 1 only, on its first step: a bug or a bad
# input in one group of a packed study, while the other group goes on training.
FAILS_IN_GROUP_1 = '''
import os
from torch import nn
import hvd_sparse


class FailsOnWorldRank1(nn.Sequential):
    def forward(self, x):
        if os.environ.get("OMPI_COMM_WORLD_RANK") == "1":
            raise ValueError("this group's model refuses its input")
        return super().forward(x)


@hvd_sparse.register_model("fails-in-group-1")
def make(input_shape, num_classes):
    c, h, w = input_shape
    return FailsOnWorldRank1(nn.Flatten(), nn.Linear(c * h * w, 16), nn.ReLU(), nn.Linear(16, num_classes))
'''


@pytest.mark.launches
def test_a_group_of_a_packed_study_that_fails_ends_the_job(tmp_path, record_property):
    """np=2 --pack 2, the group of world rank 1 fails (exit 2, one line): the job ends within the limit,
    non-zero. It hung: the failed rank waited in MPI_Finalize for the world, the other group ran every
    trial and then waited for it in the study's final gather, for ever."""
    plugin = tmp_path / "fails.py"
    plugin.write_text(FAILS_IN_GROUP_1)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({**TINY_STUDY, "model": "fails-in-group-1", "trials": 3, "max_steps": 200,
                                "eval_every": 50}))
    started = time.time()
    proc = mpirun(2, ["-m", "hvd_sparse.study", str(spec), "--out", str(tmp_path / "runs"), "--pack", "2",
                      "--plugin", str(plugin)], timeout=LIMIT * 3)
    elapsed = time.time() - started
    record_property("time_to_exit_s", round(elapsed, 1))
    assert proc.returncode != 0 and elapsed < LIMIT, describe(proc)
    (line,) = [line for line in rank_lines(proc.stdout + proc.stderr, 1) if "hvd_sparse.study: error:" in line]
    assert "this group's model refuses its input" in line, describe(proc)
