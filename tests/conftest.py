"""Shared helpers: launching real Horovod ranks (mpirun, as horovodrun does), and reading their output.

Every test that starts a process (horovodrun, mpirun, srun, a CLI) carries the ``launches`` marker,
and the fast tier (``make test-fast``: ``-m "not launches"``) leaves them out. ``launch_env()``, which
every launch goes through, fails a test that starts a process without the marker, so the fast tier
stays fast and the marker stays true.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
_TAG = re.compile(r"^\[(?:\d+,)?(\d+)\]<std(?:out|err)>:(.*)$")
_running: list[pytest.Item | None] = [None]  # the test being set up or run


# The longest test files first. `make test` hands whole files to two workers (pytest-xdist --dist
# loadfile) in collection order (--no-loadscope-reorder: xdist would otherwise order them by their
# number of tests, which put the single chaos campaign, minutes long, last and alone on one worker). Longest
# first is the classic greedy schedule: the short files fill in at the end. Measured with
# `CI=true bash .ci/run`, which lists the 30 slowest tests.
LONGEST_FIRST = ("test_chaos.py", "test_multinode.py", "test_slurm.py", "test_study.py", "test_failures.py",
                 "test_watch.py", "test_dist.py", "test_fused.py", "test_precision.py", "test_fashion.py",
                 "test_checkpoint.py", "test_examples.py", "test_lipschitz.py", "test_noise.py", "test_engines.py",
                 "test_train.py", "test_mnist.py", "test_capping.py", "test_registry.py", "test_docs.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: within a file, and the rest, as collected


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _running[0] = item  # before its fixtures: a module fixture may launch for it


def require_launches_marker() -> None:
    """Fail the running test unless it is marked ``launches``."""
    item = _running[0]
    if item is not None and item.get_closest_marker("launches") is None:
        pytest.fail(f"{item.nodeid} starts a process: mark it @pytest.mark.launches (the fast tier leaves those out)")


def launch_env() -> dict[str, str]:
    """The environment of every process a test starts (the venv's tools first)."""
    require_launches_marker()
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"  # horovodrun and launch/mpirun pass mpirun --allow-run-as-root themselves
    return env


def mpirun_cmd(np: int) -> list[str]:
    """The mpirun command horovodrun runs for ``-np N`` on this host (launch/mpirun's flags, rank-tagged
    output, horovodrun's transport), without horovodrun's own start, which imports torch to check
    Horovod's build: 1.5-2 s a launch, about 2 minutes over the suite. The tests of the README's two
    commands and of the launcher watch (``test_watch``) use horovodrun itself."""
    return [str(REPO / "launch" / "mpirun"), "--tag-output", "-np", str(np), "-H", f"localhost:{np}",
            "--mca", "pml", "ob1", "--mca", "btl", "^openib"]


def horovodrun_cmd(np: int) -> list[str]:
    return [str(BIN / "horovodrun"), "-np", str(np)]


def torchrun_cmd(np: int) -> list[str]:
    """torchrun on this host, a free port each time."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(np)]


def launched(cmd: list[str], timeout: float, cwd: Path | None) -> subprocess.CompletedProcess:
    """``cmd`` run to its end; fails the test (not hangs) on timeout."""
    try:
        return subprocess.run(cmd, env=launch_env(), cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} did not finish within {timeout} s (hang?)\n{e.stdout}\n{e.stderr}")


def mpirun(np: int, args: list[str], timeout: float = 240, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python ARGS`` on N real Horovod ranks (``mpirun_cmd``)."""
    return launched([*mpirun_cmd(np), sys.executable, *args], timeout, cwd)


def horovodrun(np: int, args: list[str], timeout: float = 240, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``horovodrun -np N python ARGS``."""
    return launched([*horovodrun_cmd(np), sys.executable, *args], timeout, cwd)


def torchrun(np: int, args: list[str], timeout: float = 240, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N ARGS`` with real ranks (torch.distributed)."""
    return launched([*torchrun_cmd(np), *args], timeout, cwd)


def default_signals() -> None:
    """In a child before it execs: the default action for the signals a test sends that a shell may
    have told this test run to ignore (`nohup make test` ignores SIGHUP, a background job of a script
    SIGINT); an ignored signal stays ignored across exec, and the job under test would live on."""
    for sig in (signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)


@contextmanager
def job_in_own_session(cmd: list[str]) -> Iterator[subprocess.Popen]:
    """A job (launcher and ranks) in a session of its own, output discarded; whatever is left of it is
    killed when the block ends."""
    job = subprocess.Popen(cmd, env=launch_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True, preexec_fn=default_signals)
    try:
        yield job
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()


def kill_rank_and_wait(job: subprocess.Popen, rank, record_property) -> None:
    """SIGKILL one rank (a psutil.Process) as a node failure would; the launcher must end the job, non-zero,
    within 60 s; the seconds it took go to the test's report (time_to_exit_s)."""
    rank.send_signal(signal.SIGKILL)
    killed = time.time()
    job.wait(timeout=60)
    record_property("time_to_exit_s", round(time.time() - killed, 1))
    assert job.returncode != 0


def run_train(np: int, *flags: str, timeout: float = 240, launcher=mpirun) -> subprocess.CompletedProcess:
    return launcher(np, ["-m", "hvd_sparse.train", "--no-progress", *flags], timeout=timeout)


def rank_lines(output: str, rank: int) -> list[str]:
    """The lines mpirun tagged as coming from ``rank`` (``[1,R]<stdout>:`` or ``<stderr>:``)."""
    lines = []
    for line in output.splitlines():
        m = _TAG.match(line)
        if m and int(m.group(1)) == rank:
            lines.append(m.group(2))
    return lines


def describe(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"


@pytest.fixture
def mount_tmpfs(tmp_path):
    """``mount_tmpfs(options)``: a real, private filesystem (tmpfs) to fill up or make read-only.

    Needs the right to mount (root, as in CI); skipped, saying so, where it is missing.
    """
    mounted = []

    def mount(options: str = "size=1m") -> Path:
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); these tests need root")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill_disk(folder: Path, leave_pages: int = 0) -> Path:
    """Fill ``folder``'s filesystem to the last page (then give back ``leave_pages`` pages of 4 KiB)."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    if leave_pages:
        os.truncate(filler, max(0, filler.stat().st_size - leave_pages * 4096))
    return filler


def spec_slice(spec: Path, folder: Path, name: str, **grid) -> Path:
    """A copy of a study spec cut to the given grid entries (e.g. sparsities=[0.0], batch_sizes=[64],
    trials=1), its per-batch budgets and evaluation intervals cut with it; everything else as in the
    spec. Returns the new spec's path."""
    import yaml

    content = yaml.safe_load(spec.read_text())
    content.update(name=name, **grid)
    for key in ("max_steps", "eval_every"):
        if isinstance(content.get(key), dict):
            content[key] = {b: content[key][b] for b in content["batch_sizes"]}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def traversable_tmp() -> Path | None:
    """A temporary folder every user may enter (for daemons that drop to their own user: munged, or
    set-up run as nobody): TMPDIR's own if its path allows it, else /tmp or /var/tmp; None if none does.
    A TMPDIR inside a private (0700) folder is where `make test` may well be started from."""
    import stat
    import tempfile

    def open_to_all(folder: Path) -> bool:
        return folder.is_dir() and all(p.stat().st_mode & stat.S_IXOTH for p in (folder, *folder.parents))

    return next((Path(d) for d in (tempfile.gettempdir(), "/tmp", "/var/tmp") if open_to_all(Path(d))), None)
