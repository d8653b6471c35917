import dataclasses

import pytest

from hvd_sparse.config import (
    Config, ConfigError, DataConfig, DistConfig, OptimConfig, PruneConfig, RunConfig, TrainConfig, seed_for,
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


@pytest.mark.parametrize("lr", [float("inf"), float("nan"), 0.0, -1.0])
def test_a_learning_rate_must_be_finite_and_positive(lr):
    with pytest.raises(ConfigError, match="--lr must be a finite number > 0"):
        OptimConfig(lr=lr)


def test_run_hashes_of_runs_from_before_the_rename_stay_the_same():
    """0.1.0 hashed grad_compression "mask"; the same run, now spelled "kept", must find its log and checkpoint."""
    kept = Config.from_dict({"dist": {"grad_compression": "kept"}})
    assert kept.identity()["dist"] == {"grad_compression": "mask"}
    assert kept.run_hash() != Config().run_hash()
    assert Config.from_dict({"dist": {"grad_compression": "kept-fp16"}}).identity()["dist"]["grad_compression"] == "mask-fp16"


def test_a_renamed_gradient_compression_names_its_new_name():
    with pytest.raises(ConfigError, match="--grad-compression mask is now called kept"):
        DistConfig(grad_compression="mask")
    assert DistConfig(grad_compression="kept-fp16").grad_compression == "kept-fp16"


def test_seed_streams_are_independent_and_stable():
    assert seed_for(0, "init") == seed_for(0, "init") < 2**63
    assert len({seed_for(0, "init"), seed_for(0, "order"), seed_for(1, "init"), seed_for(0, "batches", 1)}) == 4


def test_exact_names_never_collide():
    from hvd_sparse.config import exact

    assert [exact(v) for v in (0.0, 0.5, 0.9, 0.7, 1e-4)] == ["0", "0.5", "0.9", "0.7", "0.0001"]  # as :g wrote them
    assert exact(0.5000001) == "0.5000001" and exact(0.999999999) == "0.999999999"  # :g said 0.5 and 1
    values = [0.5, 0.5000001, 0.50000001, 0.9, 0.999999999, 1 / 3]
    assert len({exact(v) for v in values}) == len(values) and all(float(exact(v)) == v for v in values)
