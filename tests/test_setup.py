"""launch/setup.sh for a user without root: MPI and compilers found on the PATH (as a cluster's
`module load` puts them) are used as they are; where they are missing, one line says what to load."""
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import REPO, traversable_tmp

MPI = ("mpicxx", "mpirun")


@pytest.fixture
def bin_dirs():
    """Two folders a non-root user can read (the system's commands without MPI, and a 'module' of MPI's),
    and a copy of launch/setup.sh beside them: the checkout itself may be private (a home directory,
    mktemp -d), which nobody cannot read."""
    if os.geteuid() != 0 or not shutil.which("runuser") or not all(shutil.which(t) for t in MPI):
        pytest.skip("needs root (to run as nobody), runuser and an MPI on this machine")
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' on this machine to run set-up as")
    base = traversable_tmp()
    if base is None:
        pytest.skip("no temporary folder that the user nobody may enter")
    top = Path(tempfile.mkdtemp(prefix="hvd-sparse-setup-", dir=base))
    top.chmod(0o755)
    system, module = top / "system", top / "openmpi-module"
    system.mkdir()
    module.mkdir()
    for entry in Path("/usr/bin").iterdir():
        if entry.name not in MPI:
            (system / entry.name).symlink_to(entry)
    for tool in MPI:
        (module / tool).symlink_to(shutil.which(tool))
    (top / "launch").mkdir()
    shutil.copy(REPO / "launch" / "setup.sh", top / "launch" / "setup.sh")
    os.chmod(top / "launch" / "setup.sh", 0o644)
    yield system, module, top / "launch" / "setup.sh"
    shutil.rmtree(top)


def as_nobody(path, script, command):
    return subprocess.run(["runuser", "-u", "nobody", "--", "/usr/bin/env", "-i", f"PATH={path}", "HOME=/nonexistent",
                           "/bin/bash", "-c", f"source {script} && {command}"],
                          capture_output=True, text=True, timeout=60)


def test_a_user_without_root_and_without_mpi_is_told_what_to_load(bin_dirs):
    system, _, script = bin_dirs
    proc = as_nobody(system, script, "ensure_build_tools")
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("[setup] error: mpicxx mpirun not found on the PATH: load your site's MPI") and "apt-get" in line


def test_a_user_without_root_uses_the_mpi_on_the_path(bin_dirs):
    system, module, script = bin_dirs
    proc = as_nobody(f"{module}:{system}", script, "ensure_build_tools && ensure_fashion_mnist && echo ready")
    assert proc.returncode == 0 and proc.stdout.strip() == "ready", proc.stderr
    assert "apt-get install libopenmpi" not in proc.stderr  # nothing was installed, nothing asked for
