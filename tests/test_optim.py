import pytest
import torch

from hvd_sparse.config import ConfigError, OptimConfig
from hvd_sparse.optim import OPTIMIZERS, build_optimizer, learning_rate, set_learning_rate


def test_constant_schedule():
    cfg = OptimConfig(lr=0.3)
    assert [learning_rate(cfg, s, 100) for s in (0, 50, 1000)] == [0.3, 0.3, 0.3]


def test_linear_schedule_at_known_steps():
    cfg = OptimConfig(lr=1.0, schedule="linear", decay_steps=100, end_factor=0.01)
    assert learning_rate(cfg, 0, 10_000) == 1.0
    assert learning_rate(cfg, 50, 10_000) == pytest.approx(1.0 - 0.99 * 0.5)  # 0.505
    assert learning_rate(cfg, 100, 10_000) == pytest.approx(0.01)
    assert learning_rate(cfg, 5000, 10_000) == pytest.approx(0.01)  # constant after the decay


def test_linear_schedule_defaults_to_the_step_budget():
    cfg = OptimConfig(lr=0.2, schedule="linear", end_factor=0.5)
    assert learning_rate(cfg, 200, 400) == pytest.approx(0.2 * 0.75)
    assert learning_rate(cfg, 400, 400) == pytest.approx(0.1)


@pytest.mark.parametrize("kwargs", [{"schedule": "cosine"}, {"decay_steps": -1}, {"end_factor": 0.0}, {"end_factor": 2.0}])
def test_invalid_schedules_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        OptimConfig(**kwargs)


@pytest.mark.parametrize("name, momentum, nesterov", [("sgd", 0, False), ("momentum", 0.95, False), ("nesterov", 0.95, True)])
def test_optimizers(name, momentum, nesterov):
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = build_optimizer(params, OptimConfig(optimizer=name, lr=0.5, momentum=0.95))
    group = opt.param_groups[0]
    assert group["momentum"] == momentum and group["nesterov"] == nesterov and group["lr"] == 0.5
    set_learning_rate(opt, 0.25)
    assert opt.param_groups[0]["lr"] == 0.25
    assert sorted(OPTIMIZERS) == ["momentum", "nesterov", "sgd"]
