import dataclasses

import pytest

from hvd_sparse.config import (
    Config, ConfigError, DataConfig, OptimConfig, PruneConfig, RunConfig, TrainConfig, parse_config,
)


def test_defaults_are_valid_and_round_trip_through_dict():
    cfg = Config()
    assert Config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("make", [
    lambda: PruneConfig(sparsity=1.0),
    lambda: PruneConfig(sparsity=-0.1),
    lambda: TrainConfig(batch_size=0),
    lambda: TrainConfig(batch_size=-4),
    lambda: TrainConfig(batch_size=3.5),
    lambda: TrainConfig(eval_every=0),
    lambda: TrainConfig(goal_error=1.5),
    lambda: OptimConfig(lr=0.0),
    lambda: OptimConfig(momentum=1.0),
    lambda: DataConfig(val_fraction=0.0),
])
def test_invalid_values_raise_config_error(make):
    with pytest.raises(ConfigError):
        make()


def test_unknown_fields_and_sections_are_refused():
    with pytest.raises(ConfigError, match="unknown train field"):
        Config.from_dict({"train": {"batchsize": 3}})
    with pytest.raises(ConfigError, match="unknown config section"):
        Config.from_dict({"trian": {}})


def test_run_hash_ignores_operational_fields_only():
    base = Config()
    operational = dataclasses.replace(
        base,
        run=RunConfig(out="/elsewhere", progress=False, log_level="debug", overwrite=True, save_model=True),
        data=dataclasses.replace(base.data, data_dir="/data"),
        train=dataclasses.replace(base.train, eval_batch_size=17),
    )
    assert operational.run_hash() == base.run_hash()
    for changed in (
        dataclasses.replace(base, optim=dataclasses.replace(base.optim, lr=0.05)),
        dataclasses.replace(base, prune=dataclasses.replace(base.prune, sparsity=0.5)),
        dataclasses.replace(base, train=dataclasses.replace(base.train, seed=1)),
        dataclasses.replace(base, data=dataclasses.replace(base.data, split_seed=1)),
    ):
        assert changed.run_hash() != base.run_hash()


def test_cli_is_derived_from_the_dataclasses():
    cfg = parse_config(
        ["--dataset", "synthetic", "--sparsity", "0.9", "--optimizer", "nesterov", "--lr", "0.05",
         "--batch-size", "128", "--no-prune-biases", "--snip-seed", "7", "--out", "x"],
        "prog", "",
    )
    assert cfg.data.dataset == "synthetic"
    assert cfg.prune.sparsity == 0.9 and cfg.prune.prune_biases is False and cfg.prune.snip_seed == 7
    assert cfg.optim.optimizer == "nesterov" and cfg.optim.lr == 0.05
    assert cfg.train.batch_size == 128 and cfg.run.out == "x"


@pytest.mark.parametrize("argv, fragment", [
    (["--sparsity", "1.0"], "--sparsity must be in [0, 1)"),
    (["--batch-size", "3.5"], "invalid int value"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--no-such-flag"], "unrecognized arguments"),
])
def test_cli_errors_are_one_line_config_errors(argv, fragment, capsys):
    with pytest.raises(ConfigError) as exc:
        parse_config(argv, "prog", "")
    assert fragment in str(exc.value) and "\n" not in str(exc.value)
    assert capsys.readouterr().err == ""  # no usage dump
