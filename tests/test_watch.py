"""Ranks never outlive their launcher (hvd_sparse.watch): a launcher killed by any signal takes every
rank with it within seconds, checkpointed where the ranks could stop cleanly, and the rerun resumes."""
import contextlib
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from hvd_sparse.log import read_log
from hvd_sparse.settings import launcher_grace
from hvd_sparse.watch import is_launcher
from conftest import REPO, default_signals, horovodrun_cmd, launch_env

LIMIT = launcher_grace() + 10  # seconds from the launcher's death to the exit of every rank and of mpirun


@pytest.mark.parametrize("name, cmdline, launcher", [
    ("mpirun", ["mpirun", "-np", "2", "python"], True),
    ("sh", ["/bin/sh", "-c", "mpirun --allow-run-as-root -np 2 python -m hvd_sparse.train"], True),  # horovodrun, exec'd
    ("python3", ["/usr/bin/python3", "/opt/venv/bin/horovodrun", "-np", "2"], True),
    ("python3", ["python3", "-m", "torch.distributed.run", "--nproc-per-node", "2"], True),
    ("slurmstepd", ["slurmstepd: [12.0]"], True),
    ("prterun", ["prterun", "-np", "2"], True),
    ("bash", ["bash", "-c", "for spec in a b; do horovodrun -np 2 python; done"], False),  # make's shell
    ("bash", ["-bash"], False),
    ("nohup", ["nohup", "python", "-m", "hvd_sparse.train"], False),
    ("python3", ["python3", "-m", "hvd_sparse.train"], False),
])
def test_what_counts_as_a_launcher(name, cmdline, launcher):
    assert is_launcher(name, cmdline) == launcher


def test_a_launcher_is_named_as_the_user_started_it():
    """The pid horovodrun was started with runs `sh -c 'mpirun ...'` after its exec: named as both,
    never as mpirun (whose own process is the next link of the chain)."""
    from hvd_sparse.watch import describe

    class Fake:
        def __init__(self, pid, cmdline):
            self.pid, self._cmdline = pid, cmdline

        def cmdline(self):
            return self._cmdline

    assert describe(Fake(7, ["/bin/sh", "-c", "mpirun --allow-run-as-root -np 2 python"])) == \
        "horovodrun/sh -c mpirun (pid 7)"
    assert describe(Fake(8, ["mpirun", "-np", "2"])) == "mpirun (pid 8)"
    assert describe(Fake(9, ["/usr/bin/python3", "/venv/bin/horovodrun", "-np", "2"])) == "horovodrun (pid 9)"


def train_cmd(out):
    return [*horovodrun_cmd(2), sys.executable, "-m", "hvd_sparse.train", "--no-progress",
            "--dataset", "synthetic", "--model", "mlp-tiny", "--batch-size", "32", "--max-steps", "30000",
            "--eval-every", "50", "--goal-error", "0", "--out", str(out)]  # no goal: it runs until stopped


def job_processes(out):
    """Every process of the job: the ranks and mpirun carry the output folder in their command line."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if str(out) in " ".join(p.info["cmdline"] or []) and p.pid != psutil.Process().pid:
            found.append(p)
    return found


@pytest.mark.launches
@pytest.mark.parametrize("name, counts", [("mpirun", True), ("slurmstepd", False)])
def test_an_orphan_counts_as_a_launcher_gone_only_if_it_is_mpirun(tmp_path, name, counts):
    """A process named ``name`` left behind by a shell that led its group and exited: re-parented to init,
    its group's leader gone. That is horovodrun killed before its ranks started for mpirun; slurmstepd
    is re-parented to init by design, and must not count."""
    from hvd_sparse.watch import orphaned

    program = tmp_path / name
    program.symlink_to(shutil.which("sleep"))
    subprocess.run(["setsid", "sh", "-c", f"{program} 30 >/dev/null 2>&1 &"], check=True)  # sh leads, exits
    deadline = time.time() + 10
    while not (found := [p for p in psutil.process_iter(["exe", "cmdline"]) if (p.info["cmdline"] or [""])[0] == str(program)]):
        assert time.time() < deadline
        time.sleep(0.05)
    (child,) = found
    try:
        if child.ppid() != 1:
            pytest.skip(f"orphans here go to a subreaper (pid {child.ppid()}), not to init")
        assert (orphaned(child) is not None) == counts
    finally:
        child.kill()


def killed_and_gone(job, out, record_property, limit):
    """SIGKILL ``job``'s launcher (horovodrun, exec'd into sh -c 'mpirun ...'); (what is left of the job
    ``limit`` seconds later at most, killed then; the seconds until nothing was left)."""
    job.kill()
    started = time.time()
    job.wait(timeout=30)  # reaped at once: a zombie launcher counts as gone too, but this is what a shell does
    while job_processes(out) and time.time() - started < limit:
        time.sleep(0.2)
    left, elapsed = job_processes(out), time.time() - started
    for p in left:
        p.kill()
    record_property("time_to_exit_s", round(elapsed, 1))
    return left, elapsed


def freeze_and_wait(job, out, module, world_rank, record_property, timeout):
    """SIGSTOP the rank of ``job`` (``python -m module``) that is world rank ``world_rank``; (the job's exit
    code, the seconds from the freeze to it); whatever is left of the job is killed."""
    ranks = [p for p in psutil.Process(job.pid).children(recursive=True) if p.cmdline()[1:3] == ["-m", module]]
    (victim,) = [p for p in ranks if p.environ().get("OMPI_COMM_WORLD_RANK") == str(world_rank)]
    victim.suspend()
    started = time.time()
    try:
        code = job.wait(timeout=timeout)
    finally:
        for p in job_processes(out):
            p.kill()
    elapsed = time.time() - started
    record_property("time_to_exit_s", round(elapsed, 1))
    return code, elapsed


def start_and_wait_for_a_checkpoint(out, output_file):
    job = subprocess.Popen(train_cmd(out), env=launch_env(), cwd=REPO, stdout=output_file,
                           stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=default_signals)
    deadline = time.time() + 120
    while not list(out.glob("*.ckpt.pt")) and time.time() < deadline:
        assert job.poll() is None, "the run ended before the launcher was killed"
        time.sleep(0.05)
    return job


@pytest.mark.launches
@pytest.mark.parametrize("target, sig", [("horovodrun", signal.SIGKILL), ("horovodrun", signal.SIGTERM),
                                         ("horovodrun", signal.SIGHUP), ("mpirun", signal.SIGKILL)])
def test_no_rank_outlives_its_launcher(tmp_path, record_property, target, sig):
    out = tmp_path / "runs"
    with open(tmp_path / "output.txt", "w") as output:
        job = start_and_wait_for_a_checkpoint(out, output)
        launcher = psutil.Process(job.pid)  # horovodrun, which has exec'd into sh -c 'mpirun ...'
        if target == "mpirun":
            (launcher,) = [p for p in launcher.children() if p.name() in ("mpirun", "prterun")]
        launcher.send_signal(sig)
        started = time.time()
        job.wait(timeout=30)  # reaped at once: a zombie launcher counts as gone too, but this is what a shell does
        while job_processes(out) and time.time() - started < LIMIT + 20:
            time.sleep(0.2)
        left = job_processes(out)
        elapsed = time.time() - started
        for p in left:
            p.kill()
    record_property("time_to_exit_s", round(elapsed, 1))
    text = (tmp_path / "output.txt").read_text()
    assert not left and elapsed < LIMIT, f"{len(left)} processes left after {elapsed:.1f} s\n{text[-3000:]}"
    assert "Traceback" not in text, text[-3000:]
    (log_path,) = out.glob("*.h5")
    log = read_log(log_path, with_mask=False)
    assert log.status == "RUNNING" and log.attrs["interruptions"] == 1, text[-3000:]  # checkpointed on the way out
    if target != "mpirun":  # the ranks' output went through mpirun: killed, it takes their last lines with it
        assert "INTERRUPTED: stopped by" in text, text[-3000:]  # the launcher's exit, or a signal mpirun passed on
    if sig == signal.SIGKILL and target == "horovodrun":  # the lock was let go: the rerun resumes at once
        with open(tmp_path / "rerun.txt", "w") as output:
            rerun = subprocess.Popen(train_cmd(out), env=launch_env(), cwd=REPO, stdout=output,
                                     stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.time() + 60
            while "resuming at step" not in (tmp_path / "rerun.txt").read_text() and time.time() < deadline:
                assert rerun.poll() is None, (tmp_path / "rerun.txt").read_text()
                time.sleep(0.1)
            rerun.send_signal(signal.SIGTERM)  # the shell horovodrun became dies of it; the ranks see that
            rerun.wait(timeout=30)
            deadline = time.time() + LIMIT
            while job_processes(out) and time.time() < deadline:
                time.sleep(0.2)
        assert not job_processes(out), (tmp_path / "rerun.txt").read_text()
        assert read_log(log_path, with_mask=False).attrs["interruptions"] == 2, (tmp_path / "rerun.txt").read_text()


@pytest.mark.launches
def test_a_launcher_killed_before_its_ranks_started_takes_them_with_it(tmp_path, record_property):
    """SIGKILL to horovodrun the moment its mpirun appears, before the ranks have started (they import
    torch first): mpirun, re-parented to init, is the top of the chain they find, and its process group's
    leader is gone; they stop at once with a line saying so, and nothing is left. They trained on before."""
    out = tmp_path / "runs"
    with open(tmp_path / "output.txt", "w") as output:
        job = subprocess.Popen(train_cmd(out), env=launch_env(), cwd=REPO, stdout=output, stderr=subprocess.STDOUT,
                               start_new_session=True, preexec_fn=default_signals)
        deadline = time.time() + 60
        while not [p for p in psutil.Process(job.pid).children() if p.name() == "mpirun"] and time.time() < deadline:
            assert job.poll() is None
            time.sleep(0.01)
        left, elapsed = killed_and_gone(job, out, record_property, 60 + LIMIT)
    text = (tmp_path / "output.txt").read_text()
    assert not left, f"{len(left)} processes left after {elapsed:.1f} s\n{text[-3000:]}"
    assert "exited before this rank started" in text and "Traceback" not in text, text[-3000:]


def test_the_grace_follows_the_pace_of_the_run_within_its_bound():
    from hvd_sparse.watch import GRACE_BOUND, STOP_CHECK_EVERY, Pace, grace_for

    pace = Pace()
    assert grace_for(10.0, pace) == (10.0, 2.0)  # nothing measured yet: the configured grace
    for seconds in (0.05, 3.0, 0.05):  # the slowest recent step counts
        pace.note("step", seconds)
    pace.note("evaluation", 4.0)
    pace.note("checkpoint", 1.0)
    needed = STOP_CHECK_EVERY * 3.0 + 4.0 + 1.0 + 2.0
    assert grace_for(10.0, pace) == (needed, needed)
    assert grace_for(60.0, pace) == (60.0, needed)
    pace.note("step", 1000.0)
    assert grace_for(10.0, pace) == (GRACE_BOUND, STOP_CHECK_EVERY * 1000.0 + 7.0)  # bounded, and the need is said
    for _ in range(2 * STOP_CHECK_EVERY):
        pace.note("step", 0.05)  # only the recent steps count
    assert grace_for(10.0, pace)[1] == pytest.approx(STOP_CHECK_EVERY * 0.05 + 7.0)


SLOW_STEPS = '''
import time

import hvd_sparse
from hvd_sparse.measure import Measurement


@hvd_sparse.register_measurement("slow_steps")
class SlowSteps(Measurement):
    """Every step takes 0.6 s longer: steps as slow as a large batch on shared cores."""

    name = "slow_steps"

    @classmethod
    def wants(cls, cfg):
        return True

    def due(self, step):
        return True

    def after_step(self):
        time.sleep(0.6)
        return None
'''


@pytest.mark.launches
def test_steps_slower_than_the_grace_still_reach_the_agreed_step_and_checkpoint(tmp_path, monkeypatch, record_property):
    """Steps of 0.6 s, a launcher grace of 2 s: the agreed step is up to 10 steps (6 s) away when
    horovodrun is killed. The ranks wait for it at their measured pace, checkpoint there, and leave."""
    monkeypatch.setenv("HVD_SPARSE_LAUNCHER_GRACE", "2")
    plugin = tmp_path / "slow_steps.py"
    plugin.write_text(SLOW_STEPS)
    out = tmp_path / "runs"
    cmd = [*train_cmd(out), "--eval-every", "5", "--plugin", str(plugin)]
    with open(tmp_path / "output.txt", "w") as output:
        job = subprocess.Popen(cmd, env=launch_env(), cwd=REPO, stdout=output, stderr=subprocess.STDOUT,
                               start_new_session=True, preexec_fn=default_signals)
        deadline = time.time() + 120
        while not list(out.glob("*.ckpt.pt")) and time.time() < deadline:
            assert job.poll() is None, (tmp_path / "output.txt").read_text()
            time.sleep(0.05)
        time.sleep(1.5)  # a few steps past a stop check, so the agreed step is several steps away
        psutil.Process(job.pid).kill()
        killed = time.time()
        job.wait(timeout=30)
        while job_processes(out) and time.time() - killed < 60:
            time.sleep(0.2)
        left = job_processes(out)
        for p in left:
            p.kill()
    record_property("time_to_exit_s", round(time.time() - killed, 1))
    text = (tmp_path / "output.txt").read_text()
    assert not left, text[-3000:]
    (log_path,) = out.glob("*.h5")
    log = read_log(log_path, with_mask=False)
    assert log.status == "RUNNING" and log.attrs.get("interruptions") == 1, text[-3000:]  # checkpointed at the agreed step
    assert "did not stop by itself" not in text, text[-3000:]


@pytest.mark.launches
@pytest.mark.parametrize("frozen", [0, 1])
def test_a_frozen_rank_ends_the_job_instead_of_hanging_it(tmp_path, monkeypatch, record_property, frozen):
    """SIGSTOP on one rank: the other waits in a collective; after HVD_SPARSE_COLLECTIVE_TIMEOUT it
    prints one line and exits, the launcher ends the job (the frozen rank too), and the trial resumes."""
    monkeypatch.setenv("HVD_SPARSE_COLLECTIVE_TIMEOUT", "6")
    out = tmp_path / "runs"
    with open(tmp_path / "output.txt", "w") as output:
        job = start_and_wait_for_a_checkpoint(out, output)
        code, elapsed = freeze_and_wait(job, out, "hvd_sparse.train", frozen, record_property, timeout=60)
    text = (tmp_path / "output.txt").read_text()
    assert code != 0 and elapsed < 6 + 15, text[-3000:]
    other = 1 - frozen
    lines = [line for line in text.splitlines() if "hvd_sparse.train: error:" in line]
    assert len(lines) == 1 and lines[0].startswith(f"[1,{other}]<stderr>:") and \
        f"rank {other} waited 6 s in the collective" in lines[0], text[-3000:]
    assert f"did not arrive: rank {frozen} (silent for " in lines[0] and "frozen or lost)" in lines[0], lines[0]
    assert "Traceback" not in text
    assert list(out.glob("*.ckpt.pt")), "the checkpoint a rerun resumes from"


@pytest.mark.launches
def test_a_job_stopped_whole_trains_on_when_woken(tmp_path, monkeypatch, record_property):
    """SIGSTOP on every process of the job (a suspended SLURM job, Ctrl-Z) for longer than
    HVD_SPARSE_COLLECTIVE_TIMEOUT: woken, each rank's watchdog sees that it was stopped itself, so neither
    the collective it was in nor the other rank's silent heartbeats count as a wait; the job trains on
    and stops cleanly when asked."""
    monkeypatch.setenv("HVD_SPARSE_COLLECTIVE_TIMEOUT", "3")
    out = tmp_path / "runs"
    with open(tmp_path / "output.txt", "w") as output:
        job = start_and_wait_for_a_checkpoint(out, output)
        try:
            launcher = psutil.Process(job.pid)
            everyone = [launcher, *launcher.children(recursive=True)]
            ranks = [p for p in everyone if p.cmdline()[1:3] == ["-m", "hvd_sparse.train"]]
            ranks[-1].suspend()
            time.sleep(0.5)  # the other rank is surely in a collective, waiting for it, when it stops too
            for p in reversed(everyone):  # the ranks first, the launcher last
                p.suspend()
            time.sleep(3 + 1 + 2 + 1)  # longer than the timeout, the watchdog's poll and its 2 s margin
            (log_path,) = out.glob("*.h5")
            stopped_at = read_log(log_path, with_mask=False).measurements["step"][-1]
            for p in everyone:
                with contextlib.suppress(psutil.NoSuchProcess):  # gone: a watchdog took the stop for a wait
                    p.resume()
            time.sleep(3 + 2)  # past the timeout and a poll: a watchdog that counted the stop as a wait has fired
            alive = job.poll() is None
            if alive:
                launcher.send_signal(signal.SIGTERM)
            job.wait(timeout=30)
            deadline = time.time() + LIMIT
            while job_processes(out) and time.time() < deadline:
                time.sleep(0.2)
        finally:
            left = job_processes(out)
            for p in left:
                p.kill()
    text = (tmp_path / "output.txt").read_text()
    assert alive and "error:" not in text and "Traceback" not in text, text[-3000:]
    assert not left and "INTERRUPTED: stopped by" in text, text[-3000:]
    log = read_log(log_path, with_mask=False)
    assert log.status == "RUNNING" and log.attrs["interruptions"] == 1, text[-3000:]
    assert log.measurements["step"][-1] > stopped_at, "it trained on after it was woken"


@pytest.mark.launches
def test_no_packed_group_outlives_its_launcher(tmp_path, record_property):
    """A study with --pack 2 (two single-rank groups, each training its own trial): SIGKILL to
    horovodrun, and both groups checkpoint their trials and exit within the limit."""
    import json

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({
        "name": "packed", "dataset": "synthetic", "model": "mlp-tiny", "sparsities": [0.8], "optimizers": ["sgd"],
        "batch_sizes": [32], "trials": 2, "goal_error": 0.0, "max_steps": 1000000, "eval_every": 50,
        "search": {"lr": {"range": [0.01, 0.1], "scale": "log"}}}))
    out = tmp_path / "runs"
    cmd = [*horovodrun_cmd(2), sys.executable, "-m", "hvd_sparse.study", str(spec), "--out", str(out),
           "--pack", "2"]
    with open(tmp_path / "output.txt", "w") as output:
        job = subprocess.Popen(cmd, env=launch_env(), cwd=REPO, stdout=output, stderr=subprocess.STDOUT,
                               start_new_session=True)
        deadline = time.time() + 120
        while len(list(out.rglob("*.ckpt.pt"))) < 2 and time.time() < deadline:
            assert job.poll() is None, (tmp_path / "output.txt").read_text()
            time.sleep(0.05)
        left, elapsed = killed_and_gone(job, out, record_property, LIMIT + 20)
    text = (tmp_path / "output.txt").read_text()
    assert not left and elapsed < LIMIT, f"{len(left)} processes left after {elapsed:.1f} s\n{text[-3000:]}"
    logs = sorted(out.rglob("trial-*.h5"))
    assert len(logs) == 2 and "Traceback" not in text, text[-3000:]
    for path in logs:
        log = read_log(path, with_mask=False)
        assert log.status == "RUNNING" and log.attrs["interruptions"] == 1, text[-3000:]  # each group checkpointed


def three_trials_packed(tmp_path):
    """(the command, the output folder) of a study of three short trials, np=2 --pack 2."""
    import json

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({
        "name": "packed", "dataset": "synthetic", "model": "mlp-tiny", "sparsities": [0.8], "optimizers": ["sgd"],
        "batch_sizes": [32], "trials": 3, "goal_error": 0.0, "max_steps": 400, "eval_every": 20,
        "search": {"lr": {"range": [0.01, 0.1], "scale": "log"}}}))
    out = tmp_path / "runs"
    return [*horovodrun_cmd(2), sys.executable, "-m", "hvd_sparse.study", str(spec), "--out", str(out), "--pack", "2"], out


@pytest.mark.launches
def test_a_frozen_group_of_a_packed_study_ends_the_job(tmp_path, monkeypatch, record_property):
    """np=2 --pack 2, SIGSTOP on world rank 1 (a group of one, which has no collective to time out in)
    while it trains: group 0 ends the other trials, waits for it in the study's final gather, and after
    HVD_SPARSE_COLLECTIVE_TIMEOUT names it as silent and ends the job; the rerun completes the study.
    It hung: nothing watched a group of one."""
    monkeypatch.setenv("HVD_SPARSE_COLLECTIVE_TIMEOUT", "5")
    cmd, out = three_trials_packed(tmp_path)
    with open(tmp_path / "output.txt", "w") as output:
        job = subprocess.Popen(cmd, env=launch_env(), cwd=REPO, stdout=output, stderr=subprocess.STDOUT,
                               start_new_session=True, preexec_fn=default_signals)
        deadline = time.time() + 120
        while len(list(out.rglob("*.ckpt.pt"))) < 2 and time.time() < deadline:
            assert job.poll() is None, (tmp_path / "output.txt").read_text()
            time.sleep(0.05)
        code, elapsed = freeze_and_wait(job, out, "hvd_sparse.study", 1, record_property, timeout=120)
    text = (tmp_path / "output.txt").read_text()
    assert code != 0 and elapsed < 60, f"{elapsed:.1f} s\n{text[-3000:]}"
    lines = [line for line in text.splitlines() if "hvd_sparse.study: error:" in line]
    assert len(lines) == 1 and "world rank 0 of this packed job waited 5 s in 'the end of the study'" in lines[0] \
        and "rank 1 (silent for " in lines[0], text[-3000:]
    rerun = subprocess.run(cmd, env=launch_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    logs = sorted(out.rglob("trial-*.h5"))
    assert len(logs) == 3 and all(read_log(p, with_mask=False).status != "RUNNING" for p in logs), rerun.stdout[-3000:]


@pytest.mark.launches
def test_a_packed_study_stopped_whole_while_a_group_waits_for_the_others_completes(tmp_path, monkeypatch):
    """np=2 --pack 2: world rank 1 is stopped while it trains, so group 0 ends its trials and waits for it
    in the study's final gather; then every process of the job is stopped for longer than
    HVD_SPARSE_COLLECTIVE_TIMEOUT, and woken, rank 1 last. Rank 0's world watchdog takes its own stop off
    the wait and off the silence it heard, so the study completes instead of naming rank 1 as frozen."""
    monkeypatch.setenv("HVD_SPARSE_COLLECTIVE_TIMEOUT", "5")
    cmd, out = three_trials_packed(tmp_path)
    with open(tmp_path / "output.txt", "w") as output:
        job = subprocess.Popen(cmd, env=launch_env(), cwd=REPO, stdout=output, stderr=subprocess.STDOUT,
                               start_new_session=True, preexec_fn=default_signals)
        try:
            deadline = time.time() + 120
            while len(list(out.rglob("*.ckpt.pt"))) < 2 and time.time() < deadline:
                assert job.poll() is None, (tmp_path / "output.txt").read_text()
                time.sleep(0.05)
            launcher = psutil.Process(job.pid)
            everyone = [launcher, *launcher.children(recursive=True)]
            (rank1,) = [p for p in everyone if p.cmdline()[1:3] == ["-m", "hvd_sparse.study"]
                        and p.environ().get("OMPI_COMM_WORLD_RANK") == "1"]
            rank1.suspend()
            ended = lambda: sum(read_log(p, with_mask=False).status != "RUNNING" for p in out.rglob("trial-*.h5"))
            while ended() < 2 and time.time() < deadline:  # group 0's two trials: then it waits for rank 1
                assert job.poll() is None, (tmp_path / "output.txt").read_text()
                time.sleep(0.05)
            time.sleep(2.5)  # rank 0 is in the final gather by now, and still within its 5 s there
            for p in reversed(everyone):
                p.suspend()
            time.sleep(5 + 1 + 2 + 1)  # longer than the timeout, the watchdog's poll and its margin
            for p in everyone:  # rank 1 last, 1.5 s after the others: rank 0 has looked at its silence by then
                if p is not rank1:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        p.resume()
            time.sleep(1.5)
            with contextlib.suppress(psutil.NoSuchProcess):
                rank1.resume()
            code = job.wait(timeout=120)
        finally:
            for p in job_processes(out):
                p.kill()
    text = (tmp_path / "output.txt").read_text()
    assert code == 0 and "error:" not in text, text[-3000:]
    logs = sorted(out.rglob("trial-*.h5"))
    assert len(logs) == 3 and all(read_log(p, with_mask=False).status != "RUNNING" for p in logs), text[-3000:]
