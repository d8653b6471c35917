"""The SLURM scripts against a real single-node SLURM cluster (slurmctld + slurmd + munge), and the
launch helpers. The cluster is private to this module: own config, ports, state and munge socket."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from hvd_sparse.log import read_log
from hvd_sparse.settings import launcher_grace
from conftest import BIN, REPO, launch_env, mpirun, require_launches_marker

sys.path.insert(0, str(REPO / "launch"))
from slurm_hosts import expand_hostlist, expand_tasks, hosts_with_slots  # noqa: E402
from slurm_cluster import SlurmCluster  # noqa: E402


@pytest.mark.parametrize("text, hosts", [
    ("node01", ["node01"]),
    ("node[01-03,07],gpu-a[1-2]", ["node01", "node02", "node03", "node07", "gpu-a1", "gpu-a2"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("a,b[1,3],c", ["a", "b1", "b3", "c"]),
    ("gpu-a100-[1-2].cluster", ["gpu-a100-1.cluster", "gpu-a100-2.cluster"]),
])
def test_host_lists_expand_like_slurm(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("text", ["node[01-03", "node]1[", "n[3-1]", "n[a-b]", ""])
def test_bad_host_lists_are_errors(text):
    with pytest.raises(ValueError):
        expand_hostlist(text)


@pytest.mark.launches
def test_tasks_per_node_and_slots():
    assert expand_tasks("2(x3),1") == [2, 2, 2, 1]
    assert hosts_with_slots("node[01-03,07]", "2(x3),1") == [("node01", 2), ("node02", 2), ("node03", 2), ("node07", 1)]
    assert hosts_with_slots("n[1-2]", "4") == [("n1", 4), ("n2", 4)]
    with pytest.raises(ValueError, match="3 hosts"):
        hosts_with_slots("n[1-3]", "2,2")
    out = subprocess.run([sys.executable, str(REPO / "launch" / "slurm_hosts.py"), "node[01-02]", "4(x2)"],
                         env=launch_env(), capture_output=True, text=True, check=True).stdout
    assert out == "node01:4,node02:4\n"


# -- the real cluster --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm():
    require_launches_marker()
    if os.geteuid() != 0:
        pytest.skip("starting a private SLURM cluster needs root (slurmd, munged)")
    cluster = SlurmCluster()
    t0 = time.time()
    cluster.start()
    cluster.startup_seconds = time.time() - t0
    yield cluster
    cluster.stop()


def job_env(slurm):
    return slurm.env(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")


TINY = {"name": "slurm", "dataset": "synthetic", "model": "mlp-tiny", "sparsities": [0.8], "optimizers": ["nesterov"],
        "batch_sizes": [16, 32], "trials": 2, "goal_error": 0.0, "max_steps": 300, "eval_every": 50,
        "search": {"lr": {"range": [0.01, 1.0], "scale": "log"}, "momentum": {"range": [0.9, 0.99], "scale": "reverse-log"}}}


def write_spec(tmp_path, **changes):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({**TINY, **changes}))
    return path


SHORT_RUN = ["--dataset", "synthetic", "--model", "mlp-tiny", "--sparsity", "0.5", "--batch-size", "32",
             "--max-steps", "30", "--eval-every", "10", "--goal-error", "0"]


def two_rank_job(slurm, tmp_path, *sbatch_args):
    """A two-task batch job that must complete with one log of 30 steps; (its log, its output)."""
    job = slurm.sbatch("--ntasks-per-node=2", f"--output={tmp_path}/job.out", *sbatch_args, cwd=REPO, env=job_env(slurm))
    (info,) = slurm.wait(job, 120)  # polled every 0.5 s (sbatch --wait sleeps up to 32 s between its checks)
    text = (tmp_path / "job.out").read_text()
    assert info["JobState"] == "COMPLETED", text
    (log,) = (tmp_path / "runs").glob("*.h5")
    data = read_log(log)
    assert data.attrs["world_size"] == 2 and data.status == "INCOMPLETE" and list(data.measurements["step"]) == [0, 10, 20, 30]
    return data, text


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory):
    """TINY's study run whole at np=2 (mpirun, no SLURM): (its spec, its --out folder)."""
    require_launches_marker()
    folder = tmp_path_factory.mktemp("undisturbed")
    spec = write_spec(folder)
    proc = mpirun(2, ["-m", "hvd_sparse.study", str(spec), "--out", str(folder / "runs")], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return spec, folder / "runs"


@pytest.mark.launches
@pytest.mark.parametrize("sig", ["USR1", "TERM"])
def test_a_preempted_study_is_requeued_and_resumes_with_identical_measurements(slurm, undisturbed, tmp_path, sig):
    spec, reference = undisturbed
    root, output = tmp_path / "runs", tmp_path / "study.out"
    job = slurm.sbatch("--ntasks-per-node=2", f"--output={output}", "slurm/study.sbatch", str(spec), "--out", str(root),
                       cwd=REPO, env=job_env(slurm))
    deadline, asked = time.time() + 240, 0.0
    while not list(root.rglob("batch-16/trial-001.ckpt.pt")) and time.time() < deadline:
        if time.time() - asked > 1:  # asking SLURM takes a while on a busy machine: the file is looked for in between
            assert slurm.jobs(job)[0]["JobState"] in ("PENDING", "RUNNING"), output.read_text()
            asked = time.time()
        time.sleep(0.01)
    slurm.run("scancel", "--batch", f"--signal={sig}", job)  # USR1: what --signal=B:USR1@120 does before the time limit
    (info,) = slurm.wait(job, 120, until=("PENDING",))  # checkpointed, exited 0, requeued itself
    assert info["Restarts"] == "1"
    slurm.wait_idle(60)  # the first run's steps cleaned up (what SLURM's requeue delay waits for) ...
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")  # ... then skip the rest of the delay
    (info,) = slurm.wait(job, 300)
    text = output.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text
    assert text.count("INTERRUPTED: stopped by SIGUSR1") == 1 and f"checkpointed after {sig}" in text
    ended_before = text.split("INTERRUPTED:")[0].count("(ran,")  # trial 1 is short: a busy machine may stop a later one
    assert text.count("(resumed,") == 1 and text.count("(skipped,") == ended_before and text.count("(ran,") == 3, text

    ref_logs, logs = sorted(reference.rglob("trial-*.h5")), sorted(root.rglob("trial-*.h5"))
    assert [p.relative_to(reference) for p in ref_logs] == [p.relative_to(root) for p in logs]
    for a, b in zip(ref_logs, logs):
        la, lb = read_log(a), read_log(b)
        assert la.status == lb.status and la.attrs["mask_sha256"] == lb.attrs["mask_sha256"]
        for column, values in la.measurements.items():
            if column != "wall_time":
                np.testing.assert_array_equal(values, lb.measurements[column], err_msg=f"{b}: {column}")


@pytest.mark.launches
def test_a_rank_killed_under_srun_ends_the_job_and_keeps_the_log(slurm, tmp_path, record_property):
    """With --mpi=pmix, slurmstepd's PMIx error handler cancels the step when a task dies (seen with
    plain srun too); launch/srun-resumable also passes --kill-on-bad-exit=1, for sites whose MPI
    plugin would leave the other tasks waiting in their next allreduce."""
    out, output = tmp_path / "runs", tmp_path / "job.out"
    job = slurm.sbatch("--ntasks-per-node=2", f"--output={output}", "slurm/train.sbatch", "--dataset", "synthetic",
                       "--model", "simple-cnn", "--batch-size", "32", "--max-steps", "100000", "--eval-every", "20",
                       "--goal-error", "0", "--out", str(out), cwd=REPO, env=job_env(slurm))
    deadline = time.time() + 120
    while time.time() < deadline:
        logs = list(out.glob("*.h5"))
        if logs and len(read_log(logs[0]).measurements["step"]) >= 2:
            break
        assert slurm.jobs(job)[0]["JobState"] in ("PENDING", "RUNNING"), output.read_text()
        time.sleep(0.1)
    ranks = [
        p for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [])[1:3] == ["-m", "hvd_sparse.train"]
        and p.environ().get("SLURM_JOB_ID") == job]
    by_rank = {int(p.environ()["SLURM_PROCID"]): p for p in ranks}
    assert sorted(by_rank) == [0, 1]
    by_rank[1].kill()
    killed = time.time()
    (info,) = slurm.wait(job, 90)
    record_property("time_to_exit_s", round(time.time() - killed, 1))
    assert info["JobState"] == "FAILED" and time.time() - killed < 60, output.read_text()
    data = read_log(logs[0])
    assert data.status == "RUNNING" and len(data.measurements["step"]) >= 2


@pytest.mark.launches
@pytest.mark.parametrize("victim", ["srun", "batch script"])
def test_no_rank_outlives_a_killed_srun_or_batch_script(slurm, tmp_path, record_property, victim):
    """SIGKILL to the job's srun client, or to the batch script above it: the ranks (children of
    slurmstepd, not of srun) stop within the launcher-watch limit, the log is intact, and the job
    ends; nothing of it is left running."""
    out, output = tmp_path / "runs", tmp_path / "job.out"
    job = slurm.sbatch("--ntasks-per-node=2", f"--output={output}", "slurm/train.sbatch", "--dataset", "synthetic",
                       "--model", "mlp-tiny", "--batch-size", "32", "--max-steps", "1000000", "--eval-every", "50",
                       "--goal-error", "0", "--out", str(out), cwd=REPO, env=job_env(slurm))
    try:
        deadline = time.time() + 120
        while not list(out.glob("*.ckpt.pt")) and time.time() < deadline:
            assert slurm.jobs(job)[0]["JobState"] in ("PENDING", "RUNNING"), output.read_text()
            time.sleep(0.1)

        def of_job(p):
            try:
                return p.environ().get("SLURM_JOB_ID") == job
            except psutil.Error:
                return False

        def job_processes():
            return [p for p in psutil.process_iter(["cmdline"]) if "hvd_sparse.train" in " ".join(p.info["cmdline"] or [])
                    and p.pid != os.getpid() and of_job(p)]

        ranks = [p for p in job_processes() if (p.info["cmdline"] or [])[1:3] == ["-m", "hvd_sparse.train"]]
        assert len(ranks) == 2
        if victim == "srun":
            (target,) = [p for p in job_processes() if p.name() == "srun" and p.parent().name() != "srun"]  # not its helper
        else:
            (target,) = [p for p in job_processes() if "srun-resumable" in " ".join(p.cmdline()[:2])]  # bash, the script
        target.kill()
        killed = time.time()
        while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks) and time.time() - killed < 60:
            time.sleep(0.2)
        elapsed = time.time() - killed
        record_property("time_to_exit_s", round(elapsed, 1))
        alive = [p for p in ranks if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        for p in alive:
            p.kill()
        slurm.wait(job, 60)
        assert not alive and elapsed < launcher_grace() + 10, f"ranks alive {elapsed:.1f} s after the kill\n{output.read_text()}"
    finally:
        slurm.run("scancel", job, check=False)  # a failed check leaves nothing running
    (log_path,) = out.glob("*.h5")
    assert read_log(log_path, with_mask=False).status == "RUNNING"  # intact, resumable


@pytest.mark.launches
def test_srun_starts_a_torch_distributed_job_through_launch_torch_env(slurm, tmp_path):
    """srun starts the ranks and launch/torch-env turns SLURM's variables into the env:// rendezvous:
    a two-rank job on the torch engine, under launch/srun-resumable as the batch scripts run it."""
    flags = " ".join(["--no-progress", "--backend", "torch", *SHORT_RUN, "--out", str(tmp_path / "runs")])
    data, text = two_rank_job(slurm, tmp_path, f"--wrap=launch/srun-resumable launch/torch-env python -m hvd_sparse.train {flags}")
    assert data.attrs["backend"] == "torch", text
