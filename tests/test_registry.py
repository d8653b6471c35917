"""Registries and plug-ins: a user's model and dataset registered from a file, a module or an installed
entry point, trained at np=2 exactly as at np=1; bad plug-ins one line and exit 2 on every rank."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from hvd_sparse.config import ConfigError
from hvd_sparse.log import read_log
from hvd_sparse.models import MODELS
from hvd_sparse.registry import Registry, load, load_plugins
from conftest import REPO, describe, launch_env, rank_lines, run_train

# A plug-in as a user writes it: a model factory and a dataset loader, nothing of the package but its API.
PLUGIN = '''
import numpy as np
from torch import nn

import hvd_sparse
from hvd_sparse import ArrayData


@hvd_sparse.register_model("{model}")
def two_layer(input_shape, num_classes):
    c, h, w = input_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 24), nn.ReLU(), nn.Linear(24, num_classes))


@hvd_sparse.register_dataset("{dataset}")
def stripes(data_dir):
    rng = np.random.default_rng(7)
    y = rng.integers(0, 4, size=800)
    x = (rng.random((800, 1, 12, 12)) * 60).astype(np.uint8)
    for k in range(4):
        x[y == k, :, 3 * k : 3 * k + 3, :] += 150  # class k: a bright horizontal band
    return ArrayData(x, y.astype(np.int64), None, None, num_classes=4)
'''


def write_plugin(folder, name="user_plugin", model="user-net", dataset="stripes", extra=""):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    path.write_text(PLUGIN.format(model=model, dataset=dataset) + textwrap.dedent(extra))
    return path


# -- in this process ------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def registries_as_they_were(monkeypatch):
    """What a test's plug-ins register is gone after it (other tests list the registries' names)."""
    from hvd_sparse import registry
    from hvd_sparse.data import DATASETS

    from hvd_sparse.pruning import PRUNING

    for reg in (MODELS, DATASETS, PRUNING):
        monkeypatch.setattr(reg, "_entries", dict(reg._entries))
    monkeypatch.setattr(registry, "_loaded", dict(registry._loaded))


def test_a_registry_names_both_places_of_a_name_registered_twice():
    reg = Registry("widget")

    @reg.register("a")
    def first():
        pass

    with pytest.raises(ConfigError, match=r"widget 'a' is registered twice: by .*first \(.*test_registry.py:\d+\) "
                                          r"and by .*second"):
        @reg.register("a")
        def second():
            pass
    assert list(reg) == ["a"] and reg["a"] is first
    with pytest.raises(ValueError, match="unknown widget 'b'; valid: a"):
        reg["b"]


def test_a_plugin_file_registers_its_model_and_dataset(tmp_path):
    plugin = load(str(write_plugin(tmp_path, "p_file", model="file-net", dataset="file-data")))
    assert "file-net" in MODELS and MODELS["file-net"]((1, 12, 12), 4)(torch.zeros(2, 1, 12, 12)).shape == (2, 4)
    assert plugin.source.endswith("p_file.py") and len(plugin.sha256) == 64
    assert load(str(tmp_path / "p_file.py")) is plugin  # named again (CLI and spec): imported once


@pytest.mark.parametrize("name, body, message", [
    ("no_such_plugin_module", None, r"plug-in no_such_plugin_module: no module named 'no_such_plugin_module'"),
    ("missing.py", None, r"plug-in .*missing.py: no such file"),
    ("raises.py", "raise RuntimeError('no GPU here')", r"plug-in .*raises.py: importing it raised RuntimeError: no GPU here"),
    ("twice.py", "import hvd_sparse\nhvd_sparse.register_model('simple-cnn')(lambda s, k: None)",
     r"model 'simple-cnn' is registered twice: by hvd_sparse.models.SimpleCNN \(.*models.py:\d+\) and by .*twice"),
])
def test_a_bad_plugin_is_one_config_error(tmp_path, name, body, message):
    target = name
    if name.endswith(".py"):
        target = str(tmp_path / name)
        if body is not None:
            (tmp_path / name).write_text(body)
    with pytest.raises(ConfigError, match=message):
        load(target)


# -- real ranks -----------------------------------------------------------------------------------

FLAGS = ["--dataset", "stripes", "--model", "user-net", "--sparsity", "0.5", "--optimizer", "nesterov", "--lr", "0.05",
         "--batch-size", "32", "--max-steps", "30", "--eval-every", "10", "--goal-error", "0", "--save-model"]


@pytest.mark.launches
def test_a_plugin_trains_at_np2_exactly_as_at_np1(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    plugin = write_plugin(tmp_path)
    runs = {}
    for np_ in (1, 2):
        proc = run_train(np_, "--plugin", str(plugin), *FLAGS, "--out", str(tmp_path / f"np{np_}"))
        assert proc.returncode == 0, describe(proc)
        (log,) = (tmp_path / f"np{np_}").glob("*.h5")
        runs[np_] = (read_log(log), torch.load(log.with_suffix(".final.pt")))
    (l1, p1), (l2, p2) = runs[1], runs[2]
    for name in p1:
        torch.testing.assert_close(p2[name], p1[name], rtol=1e-5, atol=1e-7, msg=name)
        assert torch.count_nonzero(p2[name][~l2.mask[name]]) == 0
    assert l1.measurements["val_error"].tolist() == l2.measurements["val_error"].tolist()
    assert l1.measurements["val_error"][-1] < 0.5  # it learned the bands
    (recorded,) = json.loads(l2.attrs["plugins"])
    assert recorded["source"] == str(plugin) and recorded["sha256"] == __import__("hashlib").sha256(plugin.read_bytes()).hexdigest()


@pytest.mark.launches
@pytest.mark.parametrize("plugin, message", [
    ("no_such_plugin_module", "no module named 'no_such_plugin_module'"),
    ("raises.py", "importing it raised ZeroDivisionError: division by zero"),
])
def test_a_bad_plugin_fails_on_every_rank_with_one_line(tmp_path, plugin, message):
    if plugin.endswith(".py"):
        (tmp_path / plugin).write_text("1 / 0\n")
        plugin = str(tmp_path / plugin)
    proc = run_train(2, "--plugin", plugin, *FLAGS, "--out", str(tmp_path / "out"), timeout=60)
    assert proc.returncode == 2, describe(proc)
    for rank in (0, 1):
        errors = [line for line in rank_lines(proc.stdout + proc.stderr, rank) if "error:" in line]
        assert len(errors) == 1 and message in errors[0], describe(proc)


@pytest.mark.launches
def test_an_installed_package_registers_through_its_entry_point(tmp_path):
    site = tmp_path / "site"
    write_plugin(site, "ep_plugin", model="ep-net", dataset="ep-data")
    info = site / "ep_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[hvd_sparse.plugins]\nep = ep_plugin\n")
    flags = [f.replace("user-net", "ep-net").replace("stripes", "ep-data") for f in FLAGS]
    proc = subprocess.run([sys.executable, "-m", "hvd_sparse.train", "--no-progress", *flags, "--out", str(tmp_path / "o")],
                          env={**launch_env(), "PYTHONPATH": str(site)}, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, describe(proc)
    (log,) = (tmp_path / "o").glob("*.h5")
    assert json.loads(read_log(log).attrs["plugins"])[0]["module"] == "ep_plugin"


@pytest.mark.launches
def test_a_study_names_its_plugins_and_a_resume_says_when_they_changed(tmp_path):
    folder = tmp_path / "specs"
    write_plugin(folder)
    spec = folder / "study.json"
    spec.write_text(json.dumps({
        "name": "plugged", "dataset": "stripes", "model": "user-net", "sparsities": [0.5], "optimizers": ["sgd"],
        "batch_sizes": [32], "trials": 4, "goal_error": 0.05, "max_steps": 200, "eval_every": 10,
        "search": {"lr": {"range": [0.001, 0.1], "scale": "log"}}, "plugins": ["user_plugin.py"]}))  # beside the spec
    args = [sys.executable, "-m", "hvd_sparse.study", str(spec), "--out", str(tmp_path / "runs")]
    first = subprocess.run(args, env=launch_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0 and "CAPPED" in first.stdout, describe(first)
    with open(folder / "user_plugin.py", "a") as f:
        f.write("\n# a comment: the source changed\n")
    again = subprocess.run([*args, "--no-capping"], env=launch_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "(resumed," in again.stdout, describe(again)
    assert "resuming with plug-ins that changed since the trial began (" in again.stderr + again.stdout


LOSS_AND_NORM = """
import torch.nn.functional as F
from torch import nn
import hvd_sparse


def loss(outputs, targets):  # the module's loss: used for training, evaluation and SNIP
    return 2 * F.cross_entropy(outputs, targets)


@hvd_sparse.register_model("normed-net")
def normed(input_shape, num_classes):
    c, h, w = input_shape
    return nn.Sequential(nn.Conv2d(c, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * (h - 2) * (w - 2), num_classes))
"""


def test_a_models_module_loss_is_its_loss_and_its_own_layers_keep_their_init(tmp_path):
    from hvd_sparse.models import build_model, cross_entropy, loss_for, summed

    write_plugin(tmp_path, "lossy", model="lossy-net", dataset="lossy-data", extra=LOSS_AND_NORM)
    load(str(tmp_path / "lossy.py"))
    out, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    assert loss_for("normed-net")(out, y) == 2 * torch.nn.functional.cross_entropy(out, y)
    assert summed(loss_for("normed-net"))(out, y) == pytest.approx(5 * 2 * torch.nn.functional.cross_entropy(out, y).item())
    assert loss_for("simple-cnn") is cross_entropy
    model = build_model("normed-net", (1, 12, 12), 4, seed=0)
    assert torch.equal(model[1].weight, torch.ones(4)) and torch.equal(model[1].bias, torch.zeros(4))  # BatchNorm's own
    assert torch.equal(model[0].bias, torch.zeros(4)) and model[0].weight.std() > 0  # the reference init


@pytest.mark.launches
def test_the_plugins_loss_is_what_is_trained_and_measured(tmp_path):
    logs = {}
    for name in ("plain", "doubled"):
        plugin = write_plugin(tmp_path / name, "p",
                              extra="" if name == "plain" else "\nimport torch.nn.functional as F\n"
                              "def loss(outputs, targets):\n    return 2 * F.cross_entropy(outputs, targets)\n")
        flags = [f for f in FLAGS if f != "--save-model"]
        proc = run_train(1, "--plugin", str(plugin), *flags, "--max-steps", "1", "--out", str(tmp_path / name / "o"))
        assert proc.returncode == 0, describe(proc)
        (log,) = (tmp_path / name / "o").glob("*.h5")
        logs[name] = read_log(log).measurements
    assert logs["doubled"]["val_loss"][0] == pytest.approx(2 * logs["plain"]["val_loss"][0], rel=1e-6)  # same init
    assert logs["doubled"]["train_loss"][-1] == pytest.approx(2 * logs["plain"]["train_loss"][-1], rel=1e-6)


OWN_NORM = """

class MyNorm(nn.BatchNorm2d):  # a subclass: its own forward, which the toolkit cannot synchronize
    pass


@hvd_sparse.register_model("own-norm-net")
def own_norm(input_shape, num_classes):
    c, h, w = input_shape
    return nn.Sequential(nn.Conv2d(c, 4, 3), MyNorm(4), nn.Flatten(), nn.Linear(4 * (h - 2) * (w - 2), num_classes))
"""


@pytest.mark.launches
@pytest.mark.parametrize("model, flags, message", [
    ("normed-net", ["--noise-scale-every", "5"], "normed-net normalizes by batch statistics (1): the noise scale"),
    ("own-norm-net", [], "own-norm-net: 1 would normalize by each rank's own statistics at 2 ranks"),
])
def test_batch_statistics_that_cannot_be_kept_exact_are_refused_on_every_rank(tmp_path, model, flags, message):
    plugin = write_plugin(tmp_path, "normed", model="unused-net", dataset="normed-data", extra=LOSS_AND_NORM + OWN_NORM)
    two = run_train(2, "--plugin", str(plugin), "--model", model, "--dataset", "normed-data", "--batch-size", "32",
                    "--max-steps", "20", *flags, "--out", str(tmp_path / "np2"), timeout=60)
    assert two.returncode == 2, describe(two)
    for rank in (0, 1):
        errors = [line for line in rank_lines(two.stdout + two.stderr, rank) if "error:" in line]
        assert len(errors) == 1 and message in errors[0], describe(two)


MAGNITUDE = """

@hvd_sparse.register_pruning("largest-weights")
def largest(given):
    return {name: p.detach().abs() for name, p in given.model.named_parameters() if name in given.names}
"""


@pytest.mark.launches
def test_a_plugin_pruning_method_makes_the_mask_on_every_rank(tmp_path):
    """A score function from a plug-in: rank 0 scores, every rank holds its mask; the mask is the top-k of
    |w| at the initial weights, recomputed here independently."""
    from hvd_sparse.config import seed_for
    from hvd_sparse.models import build_model
    from hvd_sparse.pruning import kept_count

    plugin = write_plugin(tmp_path, "pruner", extra=MAGNITUDE)
    proc = run_train(2, "--plugin", str(plugin), *FLAGS, "--prune-method", "largest-weights", "--seed", "4",
                     "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, describe(proc)
    (log,) = (tmp_path / "o").glob("*.h5")
    mask = read_log(log).mask
    load(str(plugin))
    model = build_model("user-net", (1, 12, 12), 4, seed_for(4, "init"))
    weights = torch.cat([p.detach().abs().reshape(-1) for p in model.parameters()])
    k = kept_count(weights.numel(), 0.5)
    keep = torch.zeros(weights.numel(), dtype=torch.bool)
    keep[torch.argsort(weights, descending=True, stable=True)[:k]] = True
    assert torch.equal(torch.cat([keep_of.reshape(-1) for _, keep_of in mask.items()]), keep)
    assert json.loads(read_log(log).attrs["config"])["prune"]["prune_method"] == "largest-weights"
    wrong = run_train(2, "--plugin", str(plugin), *FLAGS, "--prune-method", "nope", "--out", str(tmp_path / "x"), timeout=60)
    assert wrong.returncode == 2 and "unknown pruning method 'nope'; valid: grasp, largest-weights, magnitude, random, snip, synflow" in wrong.stdout + wrong.stderr


def test_the_loss_is_the_registering_modules_even_for_a_factory_made_elsewhere(tmp_path, monkeypatch):
    from hvd_sparse.models import loss_for

    extra = """
import functools
import torch.nn.functional as F

def loss(outputs, targets):
    return 3 * F.cross_entropy(outputs, targets)

hvd_sparse.register_model("partial-net")(functools.partial(two_layer))
"""
    write_plugin(tmp_path, "partial", model="p-net", dataset="p-data", extra=extra)
    monkeypatch.chdir(tmp_path)
    load("./partial.py")
    assert load("partial.py") is load(str(tmp_path / "partial.py"))  # one file, however it is named
    out, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    assert loss_for("partial-net")(out, y) == 3 * torch.nn.functional.cross_entropy(out, y)


def test_batch_statistics_are_refused_where_they_cannot_be_exact_at_one_rank():
    from hvd_sparse import dist
    from hvd_sparse.config import Config
    from hvd_sparse.engine import check_batch_statistics

    dist.init()
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    cfg = lambda **train: Config.from_dict({"model": {"model": "bn"}, "train": train})  # noqa: E731
    check_batch_statistics(model, cfg(), fused=False)  # np=1, nothing else: allowed
    for train, message in (({"noise_scale_every": 5}, "half batches"), ({"micro_batch_size": 8}, "micro-batches"),
                           ({"lipschitz_every": 10}, "Lipschitz probe")):
        with pytest.raises(ConfigError, match=message):
            check_batch_statistics(model, cfg(**train), fused=False)
    with pytest.raises(ConfigError, match="fused trials stack parameters"):
        check_batch_statistics(model, cfg(), fused=True)
    check_batch_statistics(torch.nn.Sequential(torch.nn.InstanceNorm2d(2)), cfg(noise_scale_every=5), fused=False)


def test_a_pruning_score_is_checked_reordered_and_refused_when_not_finite():
    from hvd_sparse.config import PruneConfig
    from hvd_sparse.pruning import PRUNING, ScoreInput, prune

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    names = [n for n, _ in model.named_parameters()]
    PRUNING.register("backwards")(lambda given: {n: p.detach().abs().double() for n, p in reversed(list(
        given.model.named_parameters()))})
    PRUNING.register("nan")(lambda given: {n: torch.full_like(p, float("nan")) for n, p in given.model.named_parameters()})
    PRUNING.register("short")(lambda given: {names[0]: torch.ones(2, 3)})
    given = lambda method: ScoreInput(model, names, None, None, PruneConfig(sparsity=0.5, prune_method=method), 0)  # noqa: E731
    mask = prune(given("backwards"))  # in another key order and dtype: used in model order
    weights = torch.cat([p.detach().abs().reshape(-1) for p in model.parameters()])
    keep = torch.zeros(len(weights), dtype=torch.bool)
    keep[torch.argsort(weights, descending=True, stable=True)[:7]] = True  # 7 of 14
    assert torch.equal(torch.cat([m.reshape(-1) for _, m in mask.items()]), keep)
    with pytest.raises(ConfigError, match="not finite"):
        prune(given("nan"))
    with pytest.raises(ConfigError, match="for exactly"):
        prune(given("short"))


GRAD_NORM = """
import math
import torch
from hvd_sparse.measure import Measurement


@hvd_sparse.register_measurement("grad_norm")
class GradNorm(Measurement):
    '''The averaged gradient's norm every 3 steps, and the mean of the ranks' numbers (0.5 at np=2).'''

    name = "grad_norm"

    @classmethod
    def wants(cls, cfg):
        return True

    def __init__(self, trial):
        super().__init__(trial)
        self.norm, self.count = math.nan, 0.0

    def due(self, step):
        return step % 3 == 0

    def after_average(self, local_sq):
        grads = [p.grad.double().square().sum() for p in self.trial.model.parameters()]
        self.norm = float(torch.stack(grads).sum().sqrt())
        return torch.tensor([float(self.trial.rank)])

    def averaged(self, values):
        self.mean_rank = float(values[0])

    def after_step(self):
        self.count += 1
        return {"norm": self.norm, "mean_rank": self.mean_rank}

    def row(self):
        return {"grad_norm_measured": self.count}

    @property
    def state(self):
        return (self.count,)

    def restore(self, state):
        self.count = state[0] if state else 0.0
"""


@pytest.mark.launches
def test_a_measurement_is_one_plugin_file_taken_alike_at_np1_and_np2(tmp_path):
    """A measurement from a plug-in: its table and its evaluation-row column in the log, its values
    averaged over the ranks; the same at np=2 as at np=1."""
    plugin = write_plugin(tmp_path, "measuring", extra=GRAD_NORM)
    logs = {}
    for np_ in (1, 2):
        proc = run_train(np_, "--plugin", str(plugin), *FLAGS, "--out", str(tmp_path / f"np{np_}"))
        assert proc.returncode == 0, describe(proc)
        (log,) = (tmp_path / f"np{np_}").glob("*.h5")
        logs[np_] = read_log(log)
    for np_, mean_rank in ((1, 0.0), (2, 0.5)):
        table = logs[np_].tables["grad_norm"]
        assert table["step"].tolist() == [1, 4, 7, 10] and table["mean_rank"].tolist() == [mean_rank] * 4
        assert logs[np_].status == "COMPLETE" and logs[np_].steps_to_result == 10  # the stripes are easy
        assert logs[np_].measurements["grad_norm_measured"].tolist() == [0, 4]  # at steps 0 and 10
    np.testing.assert_allclose(logs[2].tables["grad_norm"]["norm"], logs[1].tables["grad_norm"]["norm"], rtol=1e-5)
