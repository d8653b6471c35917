import math

import pytest
from scipy.stats import qmc

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


def expected_points(space, n, skip=1, seed=None):
    """The same points computed another way: scipy's Sobol sequence generated from its first point
    (no fast-forward) and sliced, then mapped through each parameter's scale."""
    unit = qmc.Sobol(d=len(space.params), scramble=seed is not None, seed=seed).random(skip + n)[skip:]
    return [{p.name: p.value(float(u)) for p, u in zip(space.params, row)} for row in unit]


@pytest.mark.filterwarnings("ignore:The balance properties of Sobol")
def test_points_are_the_sobol_sequence_after_skip_and_a_bigger_budget_only_extends_it():
    space = reference_space("momentum", "linear")
    points = space.points(20)
    assert points == expected_points(space, 20)
    assert space.points(4, skip=2) == expected_points(space, 4, skip=2) == points[1:5]
    assert points[:5] == space.points(5)  # a bigger budget extends, never reshuffles
    assert len({tuple(p.values()) for p in points}) == 20  # no point twice
    for p in points:
        assert 1e-4 <= p["lr"] <= 1 and 0.9 <= p["momentum"] <= 0.9999 and 30000 <= p["decay_steps"] <= 60000


@pytest.mark.filterwarnings("ignore:The balance properties of Sobol")
def test_a_seed_gives_owens_scrambling_of_that_seed():
    space = reference_space("momentum", "constant")
    scrambled = space.points(8, seed=3)
    assert scrambled == expected_points(space, 8, seed=3)
    assert scrambled != space.points(8) and scrambled != space.points(8, seed=4)


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
