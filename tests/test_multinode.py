"""Multi-node for real on one machine: two hosts in network namespaces (``virtual_hosts``), TCP between
them, every launcher started on the first host as a user would, the second reached through ssh.

What only several nodes exercise: rank placement and the local rank and size (threads per rank follow
the ranks on *that* host), Open MPI over TCP instead of shared memory (and its interface selection:
every host also has Docker's 172.17.0.1), Horovod's and torch's rendezvous across hosts, trial groups
on different hosts, and a host that dies mid-job.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator

import pytest
import torch

from hvd_sparse.checkpoint import checkpoint_path
from hvd_sparse.log import read_log
from conftest import REPO, describe, launch_env
from test_study import PACK_SPEC, assert_same_study, logs_of, write_spec
from virtual_hosts import VirtualHosts

pytestmark = pytest.mark.launches

FLAGS = ["--dataset", "synthetic", "--model", "simple-cnn", "--sparsity", "0.9", "--optimizer", "nesterov",
         "--lr", "0.05", "--momentum", "0.9", "--batch-size", "48", "--max-steps", "20", "--eval-every", "10",
         "--goal-error", "0", "--save-model", "--seed", "3", "--no-progress"]
PY = sys.executable


@pytest.fixture(scope="module")
def hosts():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    cluster = VirtualHosts(["vh1", "vh2"])
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def on(hosts: VirtualHosts, host: str, command: str, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    """``command`` (a shell line) run on ``host`` from the checkout, as a user logged in there."""
    try:
        return hosts.ssh(host, command, {**launch_env(), **env}, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{command} did not finish within {timeout} s (hang?)\n{e.stdout}\n{e.stderr}")


@contextmanager
def job_on(hosts: VirtualHosts, host: str, command: str) -> Iterator[subprocess.Popen]:
    """``command`` started on ``host`` in a session of its own, output kept; whatever is left of it on this
    side is killed when the block ends."""
    job = subprocess.Popen(hosts.command(host, f"cd {REPO} && {command}", hosts.env(launch_env())),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        yield job
    finally:
        if job.poll() is None:
            os.killpg(job.pid, 9)
            job.wait()


def exit_output(job: subprocess.Popen, record_property) -> str:
    """Its output once it has exited (within 60 s), the seconds it took going to the report."""
    start = time.time()
    output, _ = job.communicate(timeout=60)
    record_property("time_to_exit_s", round(time.time() - start, 1))
    return output


def train(hosts, launcher: str, out, *extra: str, **env: str):
    proc = on(hosts, "vh1", f"{launcher} {PY} -m hvd_sparse.train {' '.join(FLAGS + list(extra))} --out {out}", **env)
    assert proc.returncode == 0, describe(proc)
    (path,) = out.glob("*.h5")
    return read_log(path), torch.load(path.with_suffix(".final.pt"))


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    """The reference: one rank, one thread, on this machine."""
    out = tmp_path_factory.mktemp("alone")
    proc = subprocess.run([PY, "-m", "hvd_sparse.train", *FLAGS, "--out", str(out)], cwd=REPO, capture_output=True,
                          text=True, env={**launch_env(), "OMP_NUM_THREADS": "1"}, timeout=240)
    assert proc.returncode == 0, describe(proc)
    (path,) = out.glob("*.h5")
    return read_log(path), torch.load(path.with_suffix(".final.pt"))


def assert_same_optimization(run, reference):
    """Same mask bit for bit; the same optimization up to float summation order (the shards' gradients
    are summed across ranks in another order than one rank sums its batch)."""
    (log, params), (ref_log, ref_params) = run, reference
    assert log.attrs["mask_sha256"] == ref_log.attrs["mask_sha256"]
    for name in ref_params:
        torch.testing.assert_close(params[name], ref_params[name], rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(torch.tensor(log.measurements["val_loss"]), torch.tensor(ref_log.measurements["val_loss"]),
                               rtol=1e-5, atol=0)
    assert log.measurements["val_error"].tolist() == ref_log.measurements["val_error"].tolist()
    for name, keep in log.mask.items():
        assert torch.count_nonzero(params[name][~keep]) == 0, name


def placement(log) -> list[tuple[str, int, int, int]]:
    return [(p["host"], p["local_rank"], p["local_size"], p["threads"]) for p in json.loads(log.attrs["placement"])]


def test_horovodrun_across_two_hosts_is_the_same_optimization_as_one_rank(hosts, alone, tmp_path):
    """horovodrun -H vh1:2,vh2:2 (Horovod finds the interface common to both hosts): two ranks per
    host, so one thread each; the same optimization as one rank with one thread."""
    run = train(hosts, "horovodrun -np 4 -H vh1:2,vh2:2", tmp_path)
    assert run[0].attrs["backend"] == "horovod" and run[0].attrs["world_size"] == 4
    assert placement(run[0]) == [("vh1", 0, 2, 1), ("vh1", 1, 2, 1), ("vh2", 0, 2, 1), ("vh2", 1, 2, 1)]
    assert_same_optimization(run, alone)


def test_mpirun_with_a_hostfile_sends_only_the_kept_entries_across_hosts(hosts, alone, tmp_path):
    """launch/mpirun with a hostfile of one slot on vh1 and two on vh2: threads follow the ranks on each
    host (2 on vh1, 1 on vh2), Open MPI's TCP stays on the hosts' network (launch/env.sh; without it a
    rank connects to 172.17.0.1 and the job hangs), and the kept-entries allreduce gives the dense
    result with the bytes the log states."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("vh1 slots=1\nvh2 slots=2\n")
    out = tmp_path / "out"
    run = train(hosts, f"launch/mpirun -np 3 --hostfile {hostfile}", out, "--grad-compression", "kept")
    assert placement(run[0]) == [("vh1", 0, 1, 2), ("vh2", 0, 2, 1), ("vh2", 1, 2, 1)]
    mask = run[0].mask
    assert run[0].attrs["allreduce_bytes_per_step"] == mask.num_kept * 4 < mask.num_total * 4 / 9
    assert run[0].measurements["allreduce_bytes"].tolist() == [s * mask.num_kept * 4 for s in run[0].measurements["step"]]
    assert_same_optimization(run, alone)


def test_the_launchers_keep_open_mpi_on_the_nodes_network(hosts):
    """launch/env.sh (sourced by launch/mpirun, horovodrun-slurm and the slurm/ scripts) gives Open MPI
    the network of the address the hostname resolves to, never docker0's, and leaves a user's own
    choice alone."""
    chosen = on(hosts, "vh2", "bash -c '. launch/env.sh && echo $OMPI_MCA_btl_tcp_if_include $OMPI_MCA_oob_tcp_if_include'")
    assert chosen.stdout.split() == ["10.213.0.0/24"] * 2, describe(chosen)
    own = on(hosts, "vh2", "bash -c '. launch/env.sh && echo ${OMPI_MCA_btl_tcp_if_include:-unset}'",
             OMPI_MCA_btl_tcp_if_exclude="lo,docker0")
    assert own.stdout.split() == ["unset"], describe(own)


def test_torchrun_on_two_nodes_with_a_rendezvous_endpoint(hosts, alone, tmp_path):
    """torchrun --nnodes 2 on each host, the c10d rendezvous on vh1: the torch engine across hosts."""
    out = tmp_path / "out"
    torchrun = (f"{PY} -m torch.distributed.run --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d "
                f"--rdzv-endpoint vh1:29477 --rdzv-id multinode-test -m hvd_sparse.train {' '.join(FLAGS)} --out {out}")
    with job_on(hosts, "vh2", torchrun) as second:
        first = on(hosts, "vh1", torchrun)
        second_out, _ = second.communicate(timeout=60)
    assert first.returncode == 0, describe(first)
    assert second.returncode == 0, second_out[-4000:]
    (path,) = out.glob("*.h5")
    log = read_log(path)
    assert log.attrs["backend"] == "torch" and log.attrs["world_size"] == 4
    assert {p[0] for p in placement(log)} == {"vh1", "vh2"}
    assert sorted(placement(log)) == [("vh1", 0, 2, 1), ("vh1", 1, 2, 1), ("vh2", 0, 2, 1), ("vh2", 1, 2, 1)]
    assert_same_optimization((log, torch.load(path.with_suffix(".final.pt"))), alone)


def test_a_packed_study_runs_its_groups_on_different_hosts(hosts, tmp_path):
    """horovodrun -np 2 -H vh1:1,vh2:1 study --pack 2: group 0 on vh1 and group 1 on vh2, each rank alone
    on its host (two threads); every log is bit for bit the study run by one rank with two threads."""
    spec = write_spec(tmp_path, **PACK_SPEC)
    packed = on(hosts, "vh1", f"horovodrun -np 2 -H vh1:1,vh2:1 {PY} -m hvd_sparse.study {spec} "
                              f"--out {tmp_path / 'packed'} --pack 2", timeout=400)
    assert packed.returncode == 0, describe(packed)
    alone = subprocess.run([PY, "-m", "hvd_sparse.study", str(spec), "--out", str(tmp_path / "alone")], cwd=REPO,
                           env={**launch_env(), "OMP_NUM_THREADS": "2"}, capture_output=True, text=True, timeout=400)
    assert alone.returncode == 0, describe(alone)
    assert_same_study(tmp_path / "alone", tmp_path / "packed")
    _, logs = logs_of(tmp_path / "packed")
    where = [placement(read_log(p, with_mask=False)) for p in logs]
    assert {w[0][0] for w in where} == {"vh1", "vh2"}, where  # both hosts ran trials
    assert all(len(w) == 1 and w[0][1:] == (0, 1, 2) for w in where), where


def test_a_host_that_dies_ends_the_job_on_the_other_and_the_rerun_resumes(hosts, tmp_path, record_property):
    """Every process of vh2 killed mid-study (a node failure): rank 0 on vh1 exits non-zero within 60 s
    with a line saying why, the log keeps its evaluations and checkpoint, and the same command, rerun
    on both hosts, resumes the trial."""
    spec = write_spec(tmp_path, batch_sizes=[32], trials=1, max_steps=300, eval_every=50)
    out = tmp_path / "runs"
    study = f"horovodrun -np 2 -H vh1:1,vh2:1 {PY} -m hvd_sparse.study {spec} --out {out}"
    with job_on(hosts, "vh1", study) as job:
        log_path = wait_for_a_checkpoint(out, job)
        hosts.kill_host("vh2")
        output = exit_output(job, record_property)
    assert job.returncode != 0, output[-4000:]
    assert hosts.processes("vh1") == [], "a process outlived the job on vh1"
    assert "Peer host:  vh2" in output, output[-4000:]  # Open MPI names the host it lost
    interrupted = read_log(log_path)
    assert interrupted.status == "RUNNING" and checkpoint_path(log_path).exists()
    rerun = on(hosts, "vh1", study, timeout=400)
    assert rerun.returncode == 0 and "resumed" in rerun.stdout, describe(rerun)
    resumed = read_log(log_path)
    assert resumed.attrs["resumes"] == 1 and resumed.status in ("COMPLETE", "INCOMPLETE")
    steps = resumed.measurements["step"].tolist()
    assert steps == sorted(set(steps)) and steps[-1] == resumed.attrs["steps_done"]


def test_a_host_cut_off_the_network_ends_the_job_instead_of_hanging_it(hosts, tmp_path, record_property):
    """vh2's link goes down mid-training (a node that loses power or its network sends nothing more, not
    even a reset): mpirun, started by launch/mpirun (launch/env.sh turns on TCP keepalive to its remote
    daemons), declares the node lost and ends the job on vh1 within 60 s. With Open MPI's defaults it
    hangs: the rank on vh1 gives up in its collective and exits, and mpirun then waits for ever to tell
    the unreachable daemon."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("vh1 slots=1\nvh2 slots=1\n")
    out = tmp_path / "runs"
    train = (f"launch/mpirun -np 2 --hostfile {hostfile} {PY} -m hvd_sparse.train --dataset synthetic --model "
             f"simple-cnn --batch-size 32 --max-steps 100000 --eval-every 50 --goal-error 0 --no-progress --out {out}")
    try:
        with job_on(hosts, "vh1", train) as job:
            wait_for_a_checkpoint(out, job, pattern="*.h5", evaluations=2)
            subprocess.run(["ip", "-n", hosts.namespace("vh2"), "link", "set", "eth0", "down"], check=True)
            output = exit_output(job, record_property)
    finally:
        hosts.kill_host("vh2")  # what the cut-off node still runs (its ranks wait out their own timeout)
        subprocess.run(["ip", "-n", hosts.namespace("vh2"), "link", "set", "eth0", "up"], check=True)
    assert job.returncode != 0 and "ORTE has lost communication with a remote daemon" in output, output[-4000:]
    assert "Remote daemon: [[" in output and "on node vh2" in output, output[-4000:]
    assert hosts.processes("vh1") == [], "a process outlived the job on vh1"


@pytest.mark.parametrize("failure", ["killed", "cut off"])
def test_a_host_lost_under_torchrun_ends_the_job_with_one_line(hosts, tmp_path, record_property, failure):
    """torchrun --nnodes 2: vh2's processes killed (Gloo reports the closed connection as a plain RuntimeError,
    which the engine recognizes) or vh2 cut off (nothing arrives: the collective watchdog, here at 10 s,
    names the silent rank). vh1's torchrun exits non-zero with the rank's one line; nothing is left."""
    out = tmp_path / "runs"
    torchrun = (f"HVD_SPARSE_COLLECTIVE_TIMEOUT=10 {PY} -m torch.distributed.run --nnodes 2 --nproc-per-node 1 "
                f"--rdzv-backend c10d --rdzv-endpoint vh1:29478 --rdzv-id lost -m hvd_sparse.train --dataset synthetic "
                f"--model simple-cnn --batch-size 32 --max-steps 100000 --eval-every 50 --goal-error 0 --no-progress "
                f"--out {out}")
    try:
        with job_on(hosts, "vh2", torchrun), job_on(hosts, "vh1", torchrun) as first:
            wait_for_a_checkpoint(out, first, pattern="*.h5", evaluations=2)
            if failure == "killed":
                hosts.kill_host("vh2")
            else:
                subprocess.run(["ip", "-n", hosts.namespace("vh2"), "link", "set", "eth0", "down"], check=True)
            output = exit_output(first, record_property)
    finally:
        hosts.kill_host("vh2")
        subprocess.run(["ip", "-n", hosts.namespace("vh2"), "link", "set", "eth0", "up"], check=True)
    expected = {"killed": "hvd_sparse.train: error: another rank failed or left the job",
                "cut off": "did not arrive: rank 1 (silent for"}[failure]
    assert first.returncode != 0 and expected in output, output[-4000:]
    assert "Traceback" not in output.split("hvd_sparse.train FAILED")[0].split(expected)[0], output[-4000:]
    assert hosts.processes("vh1") == [], "a process outlived the job on vh1"


def wait_for_a_checkpoint(out, job, pattern="trial-*.h5", evaluations=3, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        logs = list(out.rglob(pattern))
        if logs and checkpoint_path(logs[0]).exists() and len(read_log(logs[0], with_mask=False).measurements["step"]) >= evaluations:
            return logs[0]
        assert job.poll() is None, "the job ended before the host could die"
        time.sleep(0.2)
    pytest.fail("no checkpoint appeared")


# -- SLURM with two nodes: one slurmd per host, slurmctld on vh1 ----------------------------------
# Last in this file: the host-failure tests above kill every process on vh2, slurmd included.


@pytest.fixture(scope="module")
def slurm(hosts):
    from slurm_cluster import SlurmCluster

    cluster = SlurmCluster(hosts)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def sbatch(slurm, tmp_path, *args: str, timeout: float = 120) -> list[dict[str, str]]:
    """Submit from vh1 (the checkout) and wait for the job (every array task) to end. The job's PATH
    has the hosts' ssh, for launchers that reach the other node with it (horovodrun)."""
    env = slurm.env(PATH=slurm.hosts.env(launch_env())["PATH"], PYTHONUNBUFFERED="1")
    job = slurm.sbatch(f"--output={tmp_path}/job-%a.out", *args, cwd=REPO, env=env)  # polled: sbatch --wait
    # sleeps up to 32 s between its own checks
    return slurm.wait(job, timeout)


def job_output(tmp_path) -> str:
    return "\n".join(p.read_text() for p in sorted(tmp_path.glob("job-*.out")))


def test_a_pmix_fence_waits_for_every_node_under_the_launch_scripts(slurm, tmp_path, monkeypatch):
    """launch/srun-resumable has SLURM's PMIx plugin run every fence as a ring: a fence without data,
    which ends Open MPI's MPI_Init and MPI_Finalize, waits for the ranks of the other node (SLURM's own
    choice, a tree, let vh1's ranks through at once: 0.0 s, and a rank that left MPI_Init early crashed
    one still in it)."""
    monkeypatch.delenv("SLURM_PMIX_FENCE", raising=False)  # the scripts' choice, not the caller's
    program = REPO / "tests" / "rank_programs" / "fence_wait.py"
    (info,) = sbatch(slurm, tmp_path, "--nodes=2", "--ntasks-per-node=2",
                     f"--wrap=launch/srun-resumable {PY} {program} 4")
    text = job_output(tmp_path)
    assert info["JobState"] == "COMPLETED", text
    # "rank R on HOST waited W s in MPI_Finalize"
    waits = {rank: (host, float(wait)) for _, rank, _, host, _, wait, *_ in
             (line.split() for line in text.splitlines() if line.startswith("rank "))}
    assert sorted(waits) == ["0", "1", "2", "3"], text
    assert sorted(host for host, _ in waits.values()) == ["vh1", "vh1", "vh2", "vh2"], text
    assert all(wait > 2.0 for host, wait in waits.values() if host == "vh1"), text  # vh2's ranks came 4 s late


def test_train_sbatch_on_two_nodes_is_the_same_optimization_as_one_rank(slurm, alone, tmp_path):
    """sbatch --nodes=2 --ntasks-per-node=2 slurm/train.sbatch: srun --mpi=pmix starts two ranks on each
    node (one core each), Open MPI's TCP between them on the node network (launch/env.sh)."""
    (info,) = sbatch(slurm, tmp_path, "--nodes=2", "--ntasks-per-node=2", "slurm/train.sbatch", *FLAGS,
                     "--out", str(tmp_path / "runs"))
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "vh[1-2]", job_output(tmp_path)
    (path,) = (tmp_path / "runs").glob("*.h5")
    log = read_log(path)
    assert placement(log) == [("vh1", 0, 2, 1), ("vh1", 1, 2, 1), ("vh2", 0, 2, 1), ("vh2", 1, 2, 1)]
    assert_same_optimization((log, torch.load(path.with_suffix(".final.pt"))), alone)


@pytest.mark.parametrize("launcher", ["launch/horovodrun-slurm", "launch/mpirun -np 4"])
def test_the_other_launchers_inside_a_two_node_allocation(slurm, alone, tmp_path, launcher):
    """horovodrun with the hosts of the allocation (launch/horovodrun-slurm), and mpirun, which takes them
    from SLURM: two ranks per node, the same optimization as one rank."""
    command = f"{launcher} {PY} -m hvd_sparse.train {' '.join(FLAGS)} --out {tmp_path / 'runs'}"
    (info,) = sbatch(slurm, tmp_path, "--nodes=2", "--ntasks-per-node=2", f"--wrap={command}")
    assert info["JobState"] == "COMPLETED", job_output(tmp_path)
    (path,) = (tmp_path / "runs").glob("*.h5")
    log = read_log(path)
    assert placement(log) == [("vh1", 0, 2, 1), ("vh1", 1, 2, 1), ("vh2", 0, 2, 1), ("vh2", 1, 2, 1)]
    assert_same_optimization((log, torch.load(path.with_suffix(".final.pt"))), alone)


def test_study_sbatch_on_two_nodes_packs_a_group_on_each(slurm, tmp_path):
    """sbatch --nodes=2 slurm/study.sbatch --pack 2: the group of vh1's ranks and the group of vh2's run
    trials side by side, each trial once."""
    spec = write_spec(tmp_path, **PACK_SPEC)
    (info,) = sbatch(slurm, tmp_path, "--nodes=2", "--ntasks-per-node=2", "slurm/study.sbatch", str(spec),
                     "--out", str(tmp_path / "runs"), "--pack", "2", timeout=300)
    text = job_output(tmp_path)
    assert info["JobState"] == "COMPLETED", text
    assert "world size 4 as 2 groups of 2" in text and text.count("group 0: [") + text.count("group 1: [") == 4, text
    _, logs = logs_of(tmp_path / "runs")
    where = [placement(read_log(p, with_mask=False)) for p in logs]
    assert len(logs) == 4 and sorted({tuple(h for h, *_ in w) for w in where}) == [("vh1", "vh1"), ("vh2", "vh2")], where


def test_a_job_array_spreads_its_shards_over_both_nodes(slurm, tmp_path):
    """--array=1-2 of study-array.sbatch with two tasks each: one task per node (each fills a node), each
    its own shard, every trial of the grid run exactly once."""
    spec = write_spec(tmp_path, max_steps=60, eval_every=20, trials=3)
    infos = sbatch(slurm, tmp_path, "--array=1-2", "--ntasks-per-node=2", "slurm/study-array.sbatch", str(spec),
                   "--out", str(tmp_path / "runs"))
    outputs = [(tmp_path / f"job-{i}.out").read_text() for i in (1, 2)]  # shards 0/2 and 1/2
    assert all(i["JobState"] == "COMPLETED" for i in infos), outputs
    assert sorted(i["NodeList"] for i in infos) == ["vh1", "vh2"]
    _, logs = logs_of(tmp_path / "runs")
    assert len(logs) == 6 and all(read_log(p, with_mask=False).status == "INCOMPLETE" for p in logs)
    ran = [line for out in outputs for line in out.splitlines() if "(ran," in line]
    assert len(ran) == 6 and len({line.split("] ", 1)[1].split(":")[0] for line in ran}) == 6  # each trial once
    assert all("(skipped," not in out and "(busy," not in out for out in outputs)
    assert all(f"shard {i}/2" in outputs[i] for i in (0, 1))
