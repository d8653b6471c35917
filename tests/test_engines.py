"""The engine a job runs on: chosen from how it was launched, a request that cannot work is one line."""
import os

import pytest

from hvd_sparse.engines import Torch, choose
from conftest import REPO, describe, run_train, torchrun, torchrun_cmd

TORCHRUN = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "LOCAL_RANK": "0"}
MPIRUN = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}


@pytest.mark.parametrize("requested, environ, engine", [
    ("auto", TORCHRUN, "torch"),
    ("auto", MPIRUN, "horovod"),
    ("auto", {"PMIX_RANK": "0", "SLURM_PROCID": "0"}, "horovod"),  # srun --mpi=pmix
    ("auto", {"SLURM_PROCID": "0", **TORCHRUN}, "torch"),  # srun with an env:// rendezvous, or torchrun under srun
    ("auto", {}, "horovod"),  # one process started by hand, Horovod installed
    ("torch", {}, "torch"),  # ... or on torch: a job of one rank
    ("horovod", MPIRUN, "horovod"),
    ("torch", TORCHRUN, "torch"),
])
def test_the_engine_follows_the_launch(requested, environ, engine):
    assert choose(requested, environ) == engine


@pytest.mark.parametrize("requested, environ, message", [
    ("torch", MPIRUN, "--backend torch needs torch.distributed's rendezvous .* started by an MPI launcher"),
    ("horovod", TORCHRUN, "--backend horovod under torchrun: each process would be a Horovod job of one rank"),
    ("gloo", {}, "--backend must be one of auto, horovod, torch"),
])
def test_a_request_the_launch_cannot_serve_is_refused(requested, environ, message):
    with pytest.raises(ValueError, match=message):
        choose(requested, environ)


@pytest.mark.parametrize("error, peer", [
    # what Gloo raised on rank 0 when every process of the other host was killed (tests/test_multinode.py)
    (RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by "
                  "peer [10.213.0.2]:6785. This is typically caused by a remote worker crashing."), True),
    (RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection reset by peer"), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (32x10 and 20x10)"), False),  # this rank's own bug
    (ValueError("Connection closed by peer"), False),
])
def test_a_peer_that_left_is_told_from_this_ranks_own_errors_on_torch(error, peer):
    assert Torch().peer_failed(error) is peer


FLAGS = ["--dataset", "synthetic", "--model", "mlp-tiny", "--batch-size", "32", "--max-steps", "20", "--eval-every",
         "10", "--goal-error", "0", "--no-checkpoint"]


@pytest.mark.launches
def test_the_wrong_backend_for_the_launcher_is_one_line_and_exit_2_on_every_rank(tmp_path):
    proc = run_train(2, *FLAGS, "--backend", "torch", "--out", str(tmp_path), timeout=60)
    lines = [line for line in proc.stderr.splitlines() if "hvd_sparse.train: error:" in line]
    assert proc.returncode == 2 and len(lines) == 2 and "started by an MPI launcher" in lines[0], describe(proc)
    proc = torchrun(2, ["-m", "hvd_sparse.train", "--no-progress", *FLAGS, "--backend", "horovod", "--out", str(tmp_path)],
                    timeout=60)
    lines = [line for line in proc.stdout.splitlines() + proc.stderr.splitlines() if "hvd_sparse.train: error:" in line]
    assert proc.returncode != 0 and len(lines) == 2 and "under torchrun" in lines[0], describe(proc)
    # torchrun prints its own traceback (ChildFailedError) when a worker fails; the workers print none
    assert not [line for line in proc.stderr.splitlines() if f'File "{REPO / "hvd_sparse"}' in line], describe(proc)
    assert not list(tmp_path.glob("*.h5"))


LONG = ["--dataset", "synthetic", "--model", "mlp-tiny", "--batch-size", "32", "--max-steps", "400", "--eval-every", "50",
        "--goal-error", "0", "--lr", "0.05"]


@pytest.mark.launches
def test_a_killed_torchrun_rank_ends_the_job_and_the_rerun_resumes_to_horovods_measurements(tmp_path, record_property):
    """SIGKILL to rank 1 under torchrun: the job ends within seconds, the log stays, and the rerun resumes
    from the checkpoint to exactly what an uninterrupted np=2 Horovod run measures."""
    import time

    import numpy as np
    import psutil

    from hvd_sparse.log import read_log
    from conftest import job_in_own_session, kill_rank_and_wait

    whole = run_train(2, *LONG, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, describe(whole)
    cut = tmp_path / "cut"
    cmd = [*torchrun_cmd(2), "-m", "hvd_sparse.train", "--no-progress", *LONG, "--out", str(cut)]
    with job_in_own_session(cmd) as victim:
        deadline = time.time() + 120
        while not (list(cut.glob("*.ckpt.pt")) and len(read_log(next(cut.glob("*.h5"))).measurements["step"]) >= 3):
            assert victim.poll() is None and time.time() < deadline, "the run ended before it could be killed"
            time.sleep(0.05)
        ranks = [p for p in psutil.Process(victim.pid).children(recursive=True) if "hvd_sparse.train" in p.cmdline()[1:4]]
        (rank1,) = [p for p in ranks if p.environ().get("RANK") == "1"]
        kill_rank_and_wait(victim, rank1, record_property)
    rerun = torchrun(2, ["-m", "hvd_sparse.train", "--no-progress", *LONG, "--out", str(cut)])
    assert rerun.returncode == 0 and "resuming at step" in rerun.stdout + rerun.stderr, describe(rerun)
    (a,), (b,) = (tmp_path / "whole").glob("*.h5"), cut.glob("*.h5")
    la, lb = read_log(a), read_log(b)
    assert lb.attrs["resumes"] == 1 and lb.attrs["backend"] == "torch"
    for column, values in la.measurements.items():
        if column != "wall_time":
            np.testing.assert_array_equal(lb.measurements[column], values, err_msg=column)


@pytest.mark.launches
def test_without_horovod_the_toolkit_runs_on_torch(tmp_path):
    """Horovod made unimportable (a package of that name that raises ImportError, first on the path):
    a run by hand and a torchrun job both train, on the torch engine."""
    import subprocess
    import sys

    from hvd_sparse.log import read_log
    from conftest import launch_env

    blocker = tmp_path / "no-horovod" / "horovod"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('horovod is not installed here (blocked by the test)')\n")
    env = launch_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(blocker.parent), env.get("PYTHONPATH")]))
    check = subprocess.run([sys.executable, "-c", "import hvd_sparse.study, hvd_sparse.engines as e; print(e.horovod_available())"],
                           env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert check.stdout.strip() == "False", describe(check)
    for name, launch in (("alone", [sys.executable]),
                         ("torchrun", torchrun_cmd(2))):
        proc = subprocess.run([*launch, "-m", "hvd_sparse.train", "--no-progress", *FLAGS, "--out", str(tmp_path / name)],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, describe(proc)
        (log,) = (tmp_path / name).glob("*.h5")
        attrs = read_log(log, with_mask=False).attrs
        assert attrs["backend"] == "torch" and attrs["world_size"] == (1 if name == "alone" else 2)
