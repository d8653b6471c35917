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


GRADIENTS = [[1.0, -2.0, 0.5], [0.25, 1.0, -1.0], [-0.5, 0.5, 2.0], [1.0, 0.0, -0.25]]  # one per step, fixed


def by_hand(name: str, lr: float, mu: float) -> list[list[float]]:
    """The parameters after each step, by torch.optim.SGD's documented rule (dampening 0): the buffer
    v = mu * v + g (v = g at the first step); heavy ball p -= lr * v; Nesterov p -= lr * (g + mu * v);
    plain SGD p -= lr * g."""
    p, v, after = [0.0, 1.0, -1.0], [0.0, 0.0, 0.0], []
    for g in GRADIENTS:
        v = [mu * vi + gi for vi, gi in zip(v, g)]
        update = {"sgd": g, "momentum": v, "nesterov": [gi + mu * vi for gi, vi in zip(g, v)]}[name]
        p = [pi - lr * ui for pi, ui in zip(p, update)]
        after.append(p)
    return after


def steps_taken(name: str, lr: float, mu: float) -> list[list[float]]:
    param = torch.nn.Parameter(torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64))
    opt = build_optimizer([param], OptimConfig(optimizer=name, lr=lr, momentum=mu))
    after = []
    for g in GRADIENTS:
        param.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        after.append(param.detach().tolist())
    return after


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov"])
def test_real_steps_follow_the_update_rule_by_hand(name):
    taken, expected = steps_taken(name, 0.5, 0.9), by_hand(name, 0.5, 0.9)
    assert taken == [pytest.approx(p, rel=1e-12, abs=1e-12) for p in expected]


def test_the_three_optimizers_take_different_steps():
    """Nesterov is not heavy ball at any step (its first is (1 + mu) times as long); heavy ball's first step
    is plain SGD's (its buffer is the first gradient), every later one differs from both."""
    sgd, momentum, nesterov = (steps_taken(name, 0.5, 0.9) for name in ("sgd", "momentum", "nesterov"))
    assert all(n != pytest.approx(m, abs=1e-3) for n, m in zip(nesterov, momentum))
    assert momentum[0] == sgd[0]
    assert all(m != pytest.approx(s, abs=1e-3) for m, s in zip(momentum[1:], sgd[1:]))
