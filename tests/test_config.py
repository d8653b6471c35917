import dataclasses

import pytest

from hvd_sparse.config import (
    ADDED, Config, ConfigError, DataConfig, DistConfig, OptimConfig, PruneConfig, RunConfig, SECTIONS, TrainConfig,
    seed_for,
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
    """0.1.0 hashed grad_compression "mask"; the same run, now spelled "kept", must find its log and checkpoint:
    its hash is the literal one of the identity with "mask" in it (a hash of "kept" would differ)."""
    kept = Config.from_dict({"dist": {"grad_compression": "kept"}})
    assert kept.identity()["dist"] == {"grad_compression": "mask"}
    assert kept.run_hash() == "0a00e755de30e89c"
    assert Config.from_dict({"dist": {"grad_compression": "kept-fp16"}}).identity()["dist"]["grad_compression"] == "mask-fp16"


# Literal hashes: a run's log, checkpoint and study directory are found by them, so any change to what is
# hashed or how (a field added to the identity, a renamed key, another JSON spelling) orphans every log
# made before it. A deliberate change must come with a way to find the old logs, and then new literals.
DEFAULT_RUN_HASH = "64d466c0e0ffff7d"
# a small study spec with every kind of key: per-batch budgets, a fixed and a searched metaparameter, lr
# scaling, fixed config settings
PINNED_SPEC = {
    "name": "pinned", "dataset": "mnist5k", "model": "simple-cnn", "sparsities": [0.0, 0.9],
    "optimizers": ["nesterov", "sgd"], "batch_sizes": [16, 64], "trials": 2, "goal_error": 0.05,
    "max_steps": {16: 400, 64: 100}, "eval_every": 10,
    "search": {"lr": {"range": [0.002, 0.1], "scale": "log"}, "momentum": {"value": 0.9}},
    "lr_scaling": {"reference": 16, "up_to": 32}, "config": {"prune": {"snip_batches": 10}},
}


def test_the_default_configs_run_hash_is_pinned():
    assert Config().run_hash() == DEFAULT_RUN_HASH


def test_fields_added_later_stay_out_of_the_hash_at_their_defaults_and_enter_it_off_them():
    """Every field marked ADDED (from 0.4.0 on) is left out of the identity at its default, so that a run
    made before the field existed keeps its hash; set to anything else, it is in, with a pinned hash."""
    added = {name: {f.name: f.default for f in dataclasses.fields(section) if f.metadata.get("identity") == ADDED}
             for name, section in SECTIONS.items()}
    assert added["prune"].keys() == {"prune_method", "prune_scope", "prune_iterations", "prune_structure", "grasp_temperature"}
    assert added["train"].keys() == {"precision", "memory_format"}
    explicit = Config.from_dict({name: values for name, values in added.items() if values})
    assert explicit.run_hash() == DEFAULT_RUN_HASH
    assert not any(name in explicit.identity().get(section, {}) for section, values in added.items() for name in values)
    off = Config.from_dict({"prune": {"sparsity": 0.9, "prune_method": "synflow", "prune_structure": "2:4"},
                            "train": {"precision": "bf16"}})
    assert off.identity()["prune"]["prune_method"] == "synflow" and off.identity()["train"]["precision"] == "bf16"
    assert off.run_hash() == "311e49108db8331f"


def test_a_study_specs_hash_and_its_trials_run_hashes_are_pinned():
    from hvd_sparse.study import StudySpec, grid

    spec = StudySpec.from_dict(PINNED_SPEC)
    assert spec.study_hash() == "7dd1830cc0f7"
    runs = {t.label(): t.config.run_hash() for t in grid(spec)}
    assert len(runs) == 16
    assert runs["nesterov sparsity=0 batch=16 trial=0"] == "2682df34f702feae"
    assert runs["nesterov sparsity=0 batch=64 trial=0"] == "d8e7a5ea4543805f"  # lr scaled by min(64, 32) / 16
    assert runs["sgd sparsity=0.9 batch=64 trial=1"] == "07bf78f6a72dcd44"
    # where and how (data folder, fusing, capping, plug-ins, ...) stay out of the hash
    operational = {"data_dir": "/elsewhere", "fuse": 4, "capping": False, "plugins": ["my_plugin"],
                   "strict_world_size": True, "save_model": True}
    assert StudySpec.from_dict({**PINNED_SPEC, **operational}).study_hash() == "7dd1830cc0f7"
    # the pruning-methods axis, added later: absent, the hash above; present, in it
    assert StudySpec.from_dict({**PINNED_SPEC, "prune_methods": ["snip", "synflow"]}).study_hash() == "0912e644720c"


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
