"""Interrupted runs resume from their last checkpoint and measure exactly what an uninterrupted run does."""
import fcntl
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch

from hvd_sparse.checkpoint import checkpoint_path
from hvd_sparse.log import COLUMNS, read_log
from conftest import REPO, describe, job_in_own_session, kill_rank_and_wait, launch_env, mpirun_cmd

FLAGS = ["--dataset", "synthetic", "--model", "simple-cnn", "--sparsity", "0.8", "--optimizer", "momentum",
         "--lr", "0.02", "--batch-size", "32", "--max-steps", "120", "--eval-every", "20", "--goal-error", "0",
         "--save-model", "--no-progress", "--noise-scale-every", "7",  # its moving averages must resume exactly too
         "--lipschitz-every", "30"]  # measured before the kill (30, 60) and after (90, 120): none lost, none twice


def command(np_, out):
    train = [sys.executable, "-m", "hvd_sparse.train", *FLAGS, "--out", str(out)]
    return train if np_ == 1 else [*mpirun_cmd(np_), *train]


def run(np_, out, *extra, timeout=300):
    proc = subprocess.run(command(np_, out) + list(extra), env=launch_env(), cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    return proc


def the_log(out):
    (path,) = out.glob("*.h5")
    return path


def wait_for_evaluations(out, proc, count, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        logs = list(out.glob("*.h5"))
        if logs and checkpoint_path(logs[0]).exists() and len(read_log(logs[0]).measurements["step"]) >= count:
            return logs[0]
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.1)
    pytest.fail("no checkpointed evaluations appeared")


def assert_same_measurements(a, b):
    la, lb = read_log(a), read_log(b)
    for column in COLUMNS:
        if column != "wall_time":
            np.testing.assert_array_equal(la.measurements[column], lb.measurements[column], err_msg=column)
    assert la.lipschitz["step"].tolist() == lb.lipschitz["step"].tolist() == [30, 60, 90, 120]
    for key in ("value", "per_gamma"):
        np.testing.assert_array_equal(la.lipschitz[key], lb.lipschitz[key], err_msg=key)
    assert la.status == lb.status and la.attrs["mask_sha256"] == lb.attrs["mask_sha256"]
    pa, pb = torch.load(a.with_suffix(".final.pt")), torch.load(b.with_suffix(".final.pt"))
    assert all(torch.equal(pa[n], pb[n]) for n in pa)


@pytest.mark.launches
@pytest.mark.parametrize("np_", [2])  # np=1 resumes through the same code; its own kill case left out for the suite's time
def test_killed_run_resumes_with_identical_measurements(tmp_path, np_, record_property):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    proc = run(np_, whole)
    assert proc.returncode == 0, describe(proc)

    with job_in_own_session(command(np_, cut)) as victim:
        log = wait_for_evaluations(cut, victim, count=4)
        # SIGKILL a training rank (for np=2 the one of rank 1, as a node failure would)
        family = [psutil.Process(victim.pid), *psutil.Process(victim.pid).children(recursive=True)]
        ranks = [p for p in family if p.cmdline()[1:3] == ["-m", "hvd_sparse.train"]]
        assert len(ranks) == np_
        kill_rank_and_wait(victim, ranks[-1], record_property)
    interrupted = read_log(log)
    assert interrupted.status == "RUNNING" and checkpoint_path(log).exists()
    if np_ > 1:  # a strict rerun at another world size is refused on the spot, the log and checkpoint left alone
        before = log.read_bytes(), checkpoint_path(log).read_bytes()
        proc = run(1, cut, "--strict-world-size")
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
            f"hvd_sparse.train: error: {log}: interrupted at world size {np_}; --strict-world-size refuses to resume it "
            f"at 1 (rerun with {np_} ranks, or without --strict-world-size)"), describe(proc)
        assert (log.read_bytes(), checkpoint_path(log).read_bytes()) == before

    proc = run(np_, cut)
    assert proc.returncode == 0, describe(proc)
    assert "resuming at step" in proc.stderr + proc.stdout
    resumed = read_log(log)
    assert resumed.attrs["resumes"] == 1 and not checkpoint_path(log).exists()
    assert_same_measurements(the_log(whole), log)


@pytest.mark.launches
def test_a_finished_run_is_not_run_again_unless_asked(tmp_path):
    short = ["--max-steps", "20", "--eval-every", "10"]
    assert run(1, tmp_path, *short).returncode == 0
    before = the_log(tmp_path).read_bytes()
    proc = run(1, tmp_path, *short)
    assert proc.returncode == 2 and "already ended (INCOMPLETE); pass --overwrite" in proc.stderr
    assert the_log(tmp_path).read_bytes() == before
    assert run(1, tmp_path, *short, "--overwrite").returncode == 0
    assert read_log(the_log(tmp_path)).status == "INCOMPLETE"


@pytest.mark.launches
def test_a_trial_already_running_elsewhere_is_refused(tmp_path):
    short = ["--max-steps", "20", "--eval-every", "10"]
    assert run(1, tmp_path, *short).returncode == 0
    lock_path = the_log(tmp_path).with_suffix(".lock")
    with open(lock_path, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = run(1, tmp_path, *short, "--overwrite")
    assert proc.returncode == 2 and "another process is running this trial" in proc.stderr


def test_a_full_disk_while_checkpointing_says_so(mount_tmpfs):
    """torch.save reports a full disk as "unexpected pos ..."; the error must say what happened."""
    from hvd_sparse.checkpoint import Progress, save_checkpoint
    from hvd_sparse.log import StorageError
    from conftest import fill_disk

    disk = mount_tmpfs("size=256k")
    model = torch.nn.Linear(300, 300)  # 360 KB of weights: more than the disk holds
    fill_disk(disk, leave_pages=8)
    with pytest.raises(StorageError, match="cannot write the checkpoint: No space left on device") as exc:
        save_checkpoint(disk / "t.h5", Progress(), model, torch.optim.SGD(model.parameters(), lr=0.1), "r", "m")
    assert "\n" not in str(exc.value) and not list(disk.glob("*.tmp"))


def test_a_checkpoint_with_a_flipped_byte_is_never_used(tmp_path):
    """A damaged checkpoint is refused with one line naming it (torch's format has no checksum of its
    own: a flipped byte used to load without a word); one written before the checksum still loads."""
    from hvd_sparse.checkpoint import CHECKPOINT_MAGIC, Progress, load_checkpoint_state, save_checkpoint
    from hvd_sparse.log import LogError

    model = torch.nn.Linear(20, 5)
    save_checkpoint(tmp_path / "t.h5", Progress(step=40), model, torch.optim.SGD(model.parameters(), lr=0.1), "r", "m")
    path = checkpoint_path(tmp_path / "t.h5")
    good = path.read_bytes()
    assert good.startswith(CHECKPOINT_MAGIC) and load_checkpoint_state(path)["step"] == 40
    for offset in (len(good) // 2, len(good) - 30):  # inside the weights; near the end (zip directory)
        damaged = bytearray(good)
        damaged[offset] ^= 0x01
        path.write_bytes(bytes(damaged))
        with pytest.raises(LogError, match=r"t\.ckpt\.pt: the checkpoint fails its checksum \(damaged bytes\), so it is not used"):
            load_checkpoint_state(path)
    legacy = good.partition(b"\n")[2]  # the bare torch.save payload, as 0.2.0 wrote it
    path.write_bytes(legacy)
    assert load_checkpoint_state(path)["step"] == 40


def interrupted_log(tmp_path, world_size=1, measures=None, **attrs):
    """A RUNNING log and its checkpoint at step 10 (a Linear model, run hash "r"), as a killed run leaves them."""
    import json as json_
    from hvd_sparse.checkpoint import Progress, save_checkpoint
    from hvd_sparse.log import TrialLog
    from hvd_sparse.mask import Mask

    mask = Mask({"weight": torch.ones(5, 20, dtype=torch.bool)})
    log_path = tmp_path / "t.h5"
    TrialLog.create(log_path, {"config": "{}", "run_hash": "r", "world_size": world_size, "mask_sha256": mask.sha256(),
                               "hvd_sparse_version": "0", "torch_version": "0", "horovod_version": "0",
                               "world_sizes": json_.dumps([world_size]), **attrs}, mask)
    model = torch.nn.Linear(20, 5, bias=False)
    save_checkpoint(log_path, Progress(step=10, measures=measures or {}), model,
                    torch.optim.SGD(model.parameters(), lr=0.1), "r", mask.sha256(), attrs.get("data_fingerprint", ""))
    return log_path


def test_a_resume_onto_other_data_is_refused(tmp_path):
    """The log and the checkpoint hold the data's SHA-256; a rerun whose --data-dir holds other data
    (labels changed, another dataset) is refused instead of continuing silently."""
    from hvd_sparse.checkpoint import plan_start
    from hvd_sparse.log import LogError

    log_path = interrupted_log(tmp_path, data_fingerprint="a" * 64)
    assert plan_start(log_path, "r", False, "a" * 64).progress.step == 10
    with pytest.raises(LogError, match=r"t\.h5: this run was trained on other data \(SHA-256 aaaaaaaaaaaa, now bbbbbbbbbbbb\)"):
        plan_start(log_path, "r", False, "b" * 64)


def test_a_resume_at_another_world_size_is_said_or_refused_when_strict(tmp_path, caplog):
    from hvd_sparse.checkpoint import plan_start
    from hvd_sparse.log import LogError

    log_path = interrupted_log(tmp_path, world_size=2)
    with caplog.at_level("WARNING", logger="hvd_sparse"):
        assert plan_start(log_path, "r", False, world_size=2).progress.step == 10
        assert not caplog.records
        assert plan_start(log_path, "r", False, world_size=1).progress.step == 10
    (record,) = caplog.records
    assert "resuming at world size 1 a trial interrupted at 2: the same optimization only up to float summation " \
           "order" in record.getMessage()
    with pytest.raises(LogError, match=r"t\.h5: interrupted at world size 2; --strict-world-size refuses to resume it "
                                       r"at 1 \(rerun with 2 ranks, or without --strict-world-size\)"):
        plan_start(log_path, "r", False, world_size=1, strict_world_size=True)
    assert plan_start(log_path, "r", False, world_size=2, strict_world_size=True).progress.step == 10


def test_measurement_states_survive_a_checkpoint_and_an_older_ones_noise_state_is_read(tmp_path):
    """Every measurement's state goes into the checkpoint by name; a checkpoint written before 0.5.0
    kept the noise scale's alone, under ``noise``, and resumes with it."""
    import io
    from hvd_sparse.checkpoint import checkpoint_path, load_checkpoint_state, plan_start

    states = {"noise_scale": (1.5, 2.5, 0.25), "grad_norm": (3.0,)}
    log_path = interrupted_log(tmp_path, measures=states)
    assert plan_start(log_path, "r", False).progress.measures == states
    old = load_checkpoint_state(checkpoint_path(log_path))
    old["noise"] = list(old.pop("measures")["noise_scale"])
    buffer = io.BytesIO()
    torch.save(old, buffer)
    checkpoint_path(log_path).write_bytes(buffer.getvalue())  # no checksum line: read as an older version's
    assert plan_start(log_path, "r", False).progress.measures == {"noise_scale": (1.5, 2.5, 0.25)}
