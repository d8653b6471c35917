"""hvd_sparse.settings: every environment variable the toolkit reads is checked, with one line."""
import pytest

from hvd_sparse import settings
from hvd_sparse.config import ConfigError
from conftest import describe, rank_lines, run_train


@pytest.mark.parametrize("name, value, message", [
    ("HVD_SPARSE_COLLECTIVE_TIMEOUT", "abc", "must be 0 (never) or a number of seconds from 1 to 604800"),
    ("HVD_SPARSE_COLLECTIVE_TIMEOUT", "-1", "must be 0 (never)"),  # turned the watchdog off
    ("HVD_SPARSE_COLLECTIVE_TIMEOUT", "nan", "must be 0 (never)"),  # turned the watchdog off
    ("HVD_SPARSE_COLLECTIVE_TIMEOUT", "1e-9", "from 1 to 604800"),  # failed every job as "frozen or lost"
    ("HVD_SPARSE_LAUNCHER_GRACE", "abc", "a number of seconds from 0.5 to 3600"),
    ("HVD_SPARSE_LAUNCHER_GRACE", "-2", "a number of seconds from 0.5 to 3600"),  # killed the watch thread
    ("HVD_SPARSE_LAUNCHER_GRACE", "inf", "a number of seconds from 0.5 to 3600"),
    ("HVD_SPARSE_HOROVOD_DEFAULTS", "yes", "must be 0 or 1"),
    ("OMP_NUM_THREADS", "abc", "must be a positive integer"),  # torch ignored it: all cores per rank
    ("OMP_NUM_THREADS", "-2", "must be a positive integer"),
    ("OMP_NUM_THREADS", "0", "must be a positive integer"),
    ("OMP_NUM_THREADS", "\u00b2", "must be a positive integer"),  # a digit to str.isdigit, not to int()
])
def test_a_bad_value_is_one_line_naming_the_variable(monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as e:
        settings.check()
    assert str(e.value).startswith(f"{name}={value!r}: ") and message in str(e.value) and "\n" not in str(e.value)


def test_good_values_and_defaults(monkeypatch):
    for name in ("HVD_SPARSE_COLLECTIVE_TIMEOUT", "HVD_SPARSE_LAUNCHER_GRACE", "HVD_SPARSE_HOROVOD_DEFAULTS",
                 "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "")  # set but empty, as `export OMP_NUM_THREADS=$UNSET` leaves it: unset
    assert (settings.collective_timeout(), settings.launcher_grace(), settings.horovod_defaults(),
            settings.omp_threads()) == (300.0, 10.0, True, None)
    for name, value in (("HVD_SPARSE_COLLECTIVE_TIMEOUT", "0"), ("HVD_SPARSE_LAUNCHER_GRACE", "2.5"),
                        ("HVD_SPARSE_HOROVOD_DEFAULTS", "0"), ("OMP_NUM_THREADS", "4,2")):
        monkeypatch.setenv(name, value)
    assert (settings.collective_timeout(), settings.launcher_grace(), settings.horovod_defaults(),
            settings.omp_threads()) == (0.0, 2.5, False, 4)


@pytest.mark.launches
def test_a_bad_value_ends_every_rank_with_one_line_and_exit_2(monkeypatch):
    monkeypatch.setenv("HVD_SPARSE_LAUNCHER_GRACE", "abc")
    proc = run_train(2, "--dataset", "synthetic", "--model", "mlp-tiny", "--max-steps", "2", "--no-checkpoint",
                     timeout=120)
    assert proc.returncode == 2, describe(proc)
    for rank in (0, 1):
        errors = [line for line in rank_lines(proc.stderr, rank) if "error" in line]
        assert errors == ["hvd_sparse.train: error: HVD_SPARSE_LAUNCHER_GRACE='abc': must be a number of seconds "
                          "from 0.5 to 3600"], describe(proc)
