"""A private single-node SLURM cluster (munged + slurmctld + slurmd) for the tests, as root.

Installs Debian's slurm-wlm and munge with apt if they are missing, writes its own slurm.conf,
munge socket, spool and state folders under a fresh temporary folder, listens on free ports, waits
until the node is idle, and shuts everything down on ``stop()``. Clients find it through the
``SLURM_CONF`` of ``env()``.
"""
from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from conftest import traversable_tmp

PACKAGES = ["slurm-wlm", "munge"]
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def ensure_installed() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch")):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(["apt-get", "install", "-y", "-q", *PACKAGES], env=env, capture_output=True).returncode:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
        subprocess.run(["apt-get", "install", "-y", "-q", *PACKAGES], env=env, capture_output=True, check=True)


class SlurmCluster:
    """One node, this machine; or with ``hosts`` (a started ``virtual_hosts.VirtualHosts``) one node per
    virtual host, slurmctld on the first, and every client command run there too."""

    def __init__(self, hosts=None) -> None:
        base = traversable_tmp()
        if base is None:
            pytest.skip("no temporary folder the munge user may enter (munged drops to it): set TMPDIR to one")
        self.root = Path(tempfile.mkdtemp(prefix="hvd-sparse-slurm-", dir=base))
        self.root.chmod(0o755)  # munged, running as the munge user, must reach its socket folder
        self.conf = self.root / "slurm.conf"
        self.hosts = hosts
        self.host = hosts.names[0] if hosts else socket.gethostname()

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf), **extra}

    def on(self, host: str | None = None) -> list[str]:
        """The argv prefix that runs a command on ``host`` (the first node by default)."""
        return self.hosts.enter(host or self.host) if self.hosts else []

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([*self.on(), *cmd], env=kw.pop("env", self.env()), capture_output=True, text=True,
                              check=check, **kw)

    def start(self, timeout: float = 60) -> None:
        ensure_installed()
        munge = self.root / "munge"
        munge.mkdir()
        shutil.chown(munge, "munge", "munge")
        munge.chmod(0o711)
        self.socket = munge / "munge.socket"
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged", f"--socket={self.socket}",
                        "--key-file=/etc/munge/munge.key", f"--pid-file={munge}/munged.pid",
                        f"--log-file={munge}/munged.log", f"--seed-file={munge}/munged.seed"], check=True)
        for name in ("state", *(f"{kind}-{node}" for node in self.nodes for kind in ("spool", "tmp"))):
            (self.root / name).mkdir()
        cpus = len(os.sched_getaffinity(0))
        self.conf.write_text("\n".join([
            "ClusterName=hvdsparsetest", f"SlurmctldHost={self.host}",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge", f"AuthInfo=socket={self.socket}", "CredType=cred/munge",
            "SlurmUser=root", "SlurmdUser=root",
            f"StateSaveLocation={self.root}/state", f"SlurmdSpoolDir={self.root}/spool-%n",
            f"SlurmctldPidFile={self.root}/slurmctld.pid", f"SlurmdPidFile={self.root}/slurmd-%n.pid",
            f"SlurmctldLogFile={self.root}/slurmctld.log", f"SlurmdLogFile={self.root}/slurmd-%n.log",
            # each node's own TmpFS, where PMIx puts its per-step folder (nodes that share /tmp would clash)
            f"TmpFS={self.root}/tmp-%n",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "ReturnToService=2",
            "MpiDefault=none", "JobCompType=jobcomp/none", "AccountingStorageType=accounting_storage/none",
            "SchedulerParameters=sched_interval=2", "MinJobAge=600",
            # a cancelled step's tasks get SIGKILL 5 s after SIGTERM (SLURM's default: 30)
            "KillWait=5",
            # job ids name PMIx's /tmp/spmix_appdir_<uid>_<job>.<step>: keep two clusters' apart
            f"FirstJobId={random.randrange(1000, 60_000_000)}",
            *self._nodes(cpus),
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n")
        subprocess.run([*self.on(), "slurmctld", "-f", str(self.conf)], env=self.env(), check=True)
        for node in self.nodes:
            subprocess.run([*self.on(node), "slurmd", "-f", str(self.conf), "-N", node], env=self.env(), check=True)
        self.wait_idle(timeout)

    @property
    def nodes(self) -> list[str]:
        return self.hosts.names if self.hosts else [self.host]

    def _nodes(self, cpus: int) -> list[str]:
        if not self.hosts:
            return [f"NodeName={self.host} CPUs={cpus} State=UNKNOWN"]
        return [f"NodeName={h} NodeAddr={self.hosts.address[h]} CPUs={cpus} State=UNKNOWN" for h in self.hosts.names]

    def wait_idle(self, timeout: float) -> None:
        """Until the node is idle (no job or step left on it), and a second more for its clean-up."""
        deadline, state = time.time() + timeout, ""
        while time.time() < deadline:
            state = self.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip()
            if state and set(state.split()) == {"idle"}:
                time.sleep(1)
                return
            time.sleep(0.5)
        raise RuntimeError(f"the SLURM node did not become idle within {timeout} s (state {state!r}); "
                           f"see {self.root}/slurmctld.log and slurmd-*.log")

    def stop(self) -> None:
        """Cancel what still runs (a failed test's job), stop the daemons, and end any process of this
        cluster's jobs that outlived them (slurmstepd keeps a job alive across a slurmd shutdown)."""
        self.run("scancel", "--full", f"--user={os.getuid()}", check=False)
        deadline = time.time() + 15
        while self.run("squeue", "-h", check=False).stdout.strip() and time.time() < deadline:
            time.sleep(0.5)
        self.run("scontrol", "shutdown", check=False)
        pidfiles = [self.root / f"slurmd-{node}.pid" for node in self.nodes]
        for pidfile in (*pidfiles, self.root / "slurmctld.pid", self.root / "munge" / "munged.pid"):
            try:
                os.kill(int(pidfile.read_text().split()[0]), 15)
            except (OSError, ValueError):
                pass
        time.sleep(1)
        for p in psutil.process_iter():
            try:
                if p.pid != os.getpid() and p.environ().get("SLURM_CONF") == str(self.conf):
                    p.kill()
            except psutil.Error:
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    # -- jobs ----------------------------------------------------------------------------------

    def sbatch(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
        """The job id; ``wait()`` for its end (it polls every 0.5 s, where sbatch --wait sleeps up to 32 s
        between its checks)."""
        proc = self.run("sbatch", "--parsable", *args, cwd=cwd, env=env or self.env(), check=False)
        job = proc.stdout.strip().split(";")[0]
        if not job.isdigit():
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {proc.stderr.strip()}")
        return job

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """One dict of scontrol's fields per job (per array task)."""
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False).stdout
        return [dict(f.split("=", 1) for f in line.split() if "=" in f) for line in out.splitlines() if line.strip()]

    def wait(self, job_id: str, timeout: float, until: tuple[str, ...] = ENDED) -> list[dict[str, str]]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            jobs = self.jobs(job_id)
            if jobs and all(j.get("JobState") in until for j in jobs):
                return jobs
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {until} within {timeout} s: {self.jobs(job_id)}")
