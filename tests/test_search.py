import math

import pytest

from hvd_sparse.config import ConfigError
from hvd_sparse.search import Param, SearchSpace, reference_space


def test_scales_map_the_unit_interval_as_computed_by_hand():
    assert Param("lr", 1e-4, 1.0, "log").value(0.5) == pytest.approx(1e-2)
    assert Param("lr", 1e-4, 1.0, "log").value(0.0) == pytest.approx(1e-4)
    # reverse-log: log-uniform in 1 - m, from 1 - 0.9 = 1e-1 down to 1 - 0.9999 = 1e-4
    assert Param("m", 0.9, 0.9999, "reverse-log").value(0.5) == pytest.approx(1 - 10 ** -2.5)
    assert Param("m", 0.9, 0.9999, "reverse-log").value(1.0) == pytest.approx(0.9999)
    assert Param("d", 30000, 60000, "int").value(0.75) == 52500
    assert Param("d", 30000, 60000, "int").value(1 / 3) == 40000
    assert Param("x", -1.0, 3.0, "linear").value(0.25) == 0.0


def test_reference_space_first_points_by_hand():
    # unscrambled Sobol in 2-D: (0, 0) [skipped], (0.5, 0.5), (0.75, 0.25), (0.25, 0.75)
    points = reference_space("nesterov", "constant").points(3)
    expected_u = [(0.5, 0.5), (0.75, 0.25), (0.25, 0.75)]
    for point, (u_lr, u_m) in zip(points, expected_u):
        assert point["lr"] == pytest.approx(10 ** (-4 + 4 * u_lr))
        assert point["momentum"] == pytest.approx(1 - 10 ** (-1 - 3 * u_m))
    assert points[1] == {"lr": pytest.approx(0.1), "momentum": pytest.approx(1 - 10 ** -1.75)}


def test_reference_space_follows_optimizer_and_schedule():
    assert reference_space("sgd", "constant").names == ("lr",)
    assert reference_space("momentum", "linear").names == ("lr", "momentum", "decay_steps", "end_factor")


def test_points_are_deterministic_and_independent_of_anything_else():
    space = reference_space("momentum", "linear")
    assert space.points(20) == space.points(20)
    assert space.points(20)[:5] == space.points(5)  # a bigger budget extends, never reshuffles
    assert space.points(4, skip=2)[0] == space.points(4, skip=1)[1]
    scrambled = space.points(8, seed=3)
    assert scrambled == space.points(8, seed=3) and scrambled != space.points(8)


def test_round_trip_and_errors():
    space = reference_space("nesterov", "linear")
    assert SearchSpace.from_dict(space.to_dict()) == space
    with pytest.raises(ConfigError, match="unknown scale"):
        Param("lr", 1e-3, 1, "exp")
    with pytest.raises(ConfigError, match="log scale needs low > 0"):
        Param("lr", 0, 1, "log")
    with pytest.raises(ConfigError, match="reverse-log scale needs high < 1"):
        Param("m", 0.9, 1.0, "reverse-log")
    with pytest.raises(ConfigError, match="low < high"):
        Param("lr", 1, 1e-3, "log")
    with pytest.raises(ConfigError, match="must look like"):
        SearchSpace.from_dict({"lr": {"range": [1e-3]}})
    with pytest.raises(ConfigError, match="twice"):
        SearchSpace((Param("lr", 1e-3, 1, "log"), Param("lr", 1e-3, 1, "log")))
    assert all(math.isfinite(v) for p in space.points(64) for v in p.values())
