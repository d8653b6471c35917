"""A study grid in one Horovod job: every (optimizer, sparsity, batch size) x Sobol trials, resumable.

Run as ``horovodrun -np 2 python -m hvd_sparse.study studies/mini-mnist5k.yaml --out runs``.

The spec (YAML or JSON) names the workload, the grid, the trial budget and the search space; the
study directory ``<out>/<name>-<hash>`` is named by a hash of everything that changes results, and
holds ``study.json`` (the spec) and one HDF5 log per trial, in the layout
``<dataset>/<model>/<optimizer>/sparsity-<s>/batch-<B>/trial-<NNN>.h5``. Rerunning the same spec
skips the trials that ended and resumes an interrupted one from its last checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
import yaml

import hvd_sparse
from hvd_sparse import dist
from hvd_sparse.aggregate import config_columns, curve_table, format_studies, study_table
from hvd_sparse.capping import CellRecord, best_first
from hvd_sparse.checkpoint import RunLock, checkpoint_path
from hvd_sparse.cli import PLUGIN_HELP, ArgumentParser, configure_logging, guarded, say
from hvd_sparse.config import SCHEDULES, Config, ConfigError, exact, legacy_identity
from hvd_sparse.engine import (Engine, Interrupted, Job, TrialResult, check_batch, check_fusable, final_model_path,
                               load_data_everywhere, select_device, stop_requested, validate)
from hvd_sparse.log import LogData, LogError, check_writable, copy_log, read_log, regular_bytes, unwritable, write_atomically
from hvd_sparse.registry import load_plugins, plugin_digest
from hvd_sparse.search import SearchSpace, reference_space

PROG = "hvd_sparse.study"
SPEC_FILE = "study.json"
OPERATIONAL = ("data_dir", "fuse", "capping", "plugins", "strict_world_size", "save_model")  # spec keys that say how or where, never what: out of the hash

# config fields the grid sets itself; a spec's ``config`` section may not override them
GRID_FIELDS = {
    "data": {"dataset", "data_dir"}, "model": {"model"}, "prune": {"sparsity"},
    "optim": {"optimizer", "schedule", "lr", "momentum", "decay_steps", "end_factor"},
    "train": {"batch_size", "max_steps", "eval_every", "goal_error", "seed"}, "run": None,  # None: the whole section
}


def _ints(values: Any, what: str) -> tuple[int, ...]:
    if not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(f"study spec: {what} must be a non-empty list")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise ConfigError(f"study spec: {what} must be positive integers, got {list(values)}")
    return tuple(values)


def _per_batch(value: Any, batch_sizes: Sequence[int], what: str) -> int | dict[int, int]:
    """A positive integer for every batch size, or a map from each batch size to its own (YAML
    ``{16: 4000, 32: 2000}``; JSON's string keys are read as integers)."""
    if not isinstance(value, Mapping):
        return value  # an int: checked by the trial config
    try:
        per = {int(k): v for k, v in value.items()}
    except (TypeError, ValueError):
        raise ConfigError(f"study spec: {what} maps batch sizes to values; got keys {list(value)}") from None
    missing, extra = sorted(set(batch_sizes) - set(per)), sorted(set(per) - set(batch_sizes))
    if missing or extra:
        raise ConfigError(f"study spec: {what} must give exactly the batch sizes {list(batch_sizes)}"
                          + (f"; missing {missing}" if missing else "") + (f"; not in the grid {extra}" if extra else ""))
    return dict(sorted(per.items()))


@dataclass(frozen=True)
class StudySpec:
    """A study grid. Every field but the OPERATIONAL ones (where and how, never what) enters the study hash."""

    name: str
    dataset: str
    model: str
    sparsities: tuple[float, ...]
    optimizers: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    trials: int
    goal_error: float
    max_steps: int | Mapping[int, int]  # the step budget; or one per batch size
    eval_every: int | Mapping[int, int]  # the evaluation interval in steps; or one per batch size
    schedule: str = "constant"
    search: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # overrides of the reference space
    lr_scaling: Mapping[str, int] | None = None  # {reference: B_ref, up_to: B_max}: lr x min(B, B_max) / B_ref
    sobol_skip: int = 1
    sobol_seed: int | None = None
    seed: int = 0
    config: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # fixed settings of every trial
    data_dir: str | None = None  # where the data is, not what it is: kept out of the hash
    fuse: int = 1  # trials of a cell trained together as one fused model; how, not what: kept out of the hash
    # stop a trial that can no longer beat its cell's best (hvd_sparse.capping): the cell's answer is the
    # same either way, so it is kept out of the hash and capped and uncapped logs live in one study
    capping: bool = True
    # refuse to resume a trial at another world size than it was interrupted at (--strict-world-size)
    strict_world_size: bool = False
    # each trial's final parameters beside its log (<log>.final.pt), as hvd_sparse.train --save-model
    save_model: bool = False
    # plug-ins imported before the grid's names are looked up (paths relative to the spec's folder): where the
    # code is, not what it does (each log records each plug-in's source and its SHA-256); out of the hash
    plugins: tuple[str, ...] = ()
    # pruning methods as a grid axis, like sparsities (config.prune.prune_method for one alone); empty: the
    # config's method, and the paths and hash of a study from before the axis existed
    prune_methods: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ConfigError(f"study spec: name must be letters, digits, '-', '_' or '.', got {self.name!r}")
        if not isinstance(self.fuse, int) or isinstance(self.fuse, bool) or self.fuse < 1:
            raise ConfigError(f"study spec: fuse must be a positive number of trials, got {self.fuse!r}")
        if not isinstance(self.capping, bool):
            raise ConfigError(f"study spec: capping must be true or false, got {self.capping!r}")
        if not isinstance(self.plugins, tuple) or not all(isinstance(p, str) and p for p in self.plugins):
            raise ConfigError(f"study spec: plugins must be a list of module names or .py files, got {self.plugins!r}")
        if not isinstance(self.trials, int) or self.trials < 1:
            raise ConfigError(f"study spec: trials must be a positive integer, got {self.trials!r}")
        for key in ("max_steps", "eval_every"):
            object.__setattr__(self, key, _per_batch(getattr(self, key), self.batch_sizes, key))
        if not isinstance(self.sparsities, tuple) or not self.sparsities:
            raise ConfigError("study spec: sparsities must be a non-empty list")
        if not isinstance(self.prune_methods, tuple) or not all(isinstance(m, str) and m for m in self.prune_methods):
            raise ConfigError(f"study spec: prune_methods must be a list of pruning method names, got {self.prune_methods!r}")
        if self.prune_methods and "prune_method" in self.config.get("prune", {}):
            raise ConfigError("study spec: config.prune may not set prune_method (the grid's prune_methods sets it)")
        for what in ("sparsities", "optimizers", "batch_sizes", "prune_methods"):
            values = getattr(self, what)
            if len(set(values)) != len(values):
                raise ConfigError(f"study spec: {what} lists a value twice: {list(values)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"study spec: schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not isinstance(self.sobol_skip, int) or self.sobol_skip < 0:
            raise ConfigError(f"study spec: sobol.skip must be a non-negative integer, got {self.sobol_skip!r}")
        for section, values in self.config.items():
            fixed = GRID_FIELDS.get(section, set())
            clash = set(values) if fixed is None else set(values) & fixed
            if clash:
                raise ConfigError(f"study spec: config.{section} may not set {', '.join(sorted(clash))} (the grid sets it)")
        self._check_lr_scaling()
        for optimizer in self.optimizers:
            self.space(optimizer), self.fixed(optimizer)  # unknown search names, bad ranges, bad values
            for method in self.methods():
                for sparsity in self.sparsities:
                    for batch_size in self.batch_sizes:  # every other field, by the config's own checks
                        self.trial_config(optimizer, sparsity, batch_size, 0, self.fixed(optimizer), method)

    def _check_lr_scaling(self) -> None:
        if self.lr_scaling is None:
            return
        scaling = self.lr_scaling
        if not isinstance(scaling, Mapping) or set(scaling) != {"reference", "up_to"} or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in scaling.values()):
            raise ConfigError(f"study spec: lr_scaling must look like {{reference: 16, up_to: 256}} (positive "
                              f"batch sizes), got {scaling!r}")

    # -- reading -----------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StudySpec":
        if not isinstance(d, Mapping):
            raise ConfigError("study spec: expected a mapping of keys (name, dataset, model, ...)")
        d = dict(d)
        sobol = d.pop("sobol", None) or {}
        if not isinstance(sobol, Mapping) or set(sobol) - {"skip", "seed"}:
            raise ConfigError("study spec: sobol must look like {skip: 1, seed: null}")
        known = {f.name for f in dataclasses.fields(cls)} - {"sobol_skip", "sobol_seed"}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"study spec: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(known | {'sobol'}))}")
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING]  # type: ignore[misc]
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(f"study spec: missing key(s) {', '.join(missing)}")
        for key in ("search", "config"):
            if not isinstance(d.get(key, {}), Mapping) or not all(isinstance(v, Mapping) for v in d.get(key, {}).values()):
                raise ConfigError(f"study spec: {key} must map names to mappings")
        sparsities = d["sparsities"]
        if not isinstance(sparsities, (list, tuple)) or not all(isinstance(s, (int, float)) for s in sparsities):
            raise ConfigError(f"study spec: sparsities must be a list of numbers, got {sparsities!r}")
        optimizers = d["optimizers"]
        if not isinstance(optimizers, (list, tuple)) or not optimizers or not all(isinstance(o, str) for o in optimizers):
            raise ConfigError(f"study spec: optimizers must be a non-empty list of names, got {optimizers!r}")
        try:
            return cls(
                **{**d, "sparsities": tuple(float(s) for s in sparsities), "optimizers": tuple(optimizers),
                   "batch_sizes": _ints(d["batch_sizes"], "batch_sizes"),
                   "search": {k: dict(v) for k, v in d.get("search", {}).items()},
                   **({"plugins": tuple(d["plugins"])} if isinstance(d.get("plugins"), list) else {}),
                   **({"prune_methods": tuple(d["prune_methods"])} if isinstance(d.get("prune_methods"), list) else {}),
                   **({"lr_scaling": dict(d["lr_scaling"])} if isinstance(d.get("lr_scaling"), Mapping) else {}),
                   "config": {k: dict(v) for k, v in d.get("config", {}).items()}},
                sobol_skip=sobol.get("skip", 1), sobol_seed=sobol.get("seed"),
            )
        except TypeError as e:
            raise ConfigError(f"study spec: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> "StudySpec":
        path = Path(path)
        try:  # the file the user names may be a pipe (study <(make-spec)): read as it comes, at most 1 MiB
            with open(path, "rb") as f:
                text = f.read(SPEC_MAX_BYTES + 1).decode()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read the study spec: {getattr(e, 'strerror', None) or e}") from None
        try:
            d = json.loads(text) if path.suffix == ".json" else bounded_yaml(text)
        except (ValueError, yaml.YAMLError, RecursionError) as e:
            first = "nested too deeply" if isinstance(e, RecursionError) else (
                str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
            raise ConfigError(f"{path}: not a valid {'JSON' if path.suffix == '.json' else 'YAML'} study spec: {first}") from None
        try:
            spec = cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        here = lambda p: str(path.parent / p) if p.endswith(".py") and not Path(p).is_absolute() else p  # noqa: E731
        return dataclasses.replace(spec, plugins=tuple(here(p) for p in spec.plugins))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["sobol"] = {"skip": d.pop("sobol_skip"), "seed": d.pop("sobol_seed")}
        d["plugins"] = list(d["plugins"])
        if d["lr_scaling"] is None:
            del d["lr_scaling"]  # specs from before it existed keep their hash
        if not d["prune_methods"]:
            del d["prune_methods"]  # likewise
        for key in ("max_steps", "eval_every"):  # string keys, as JSON (study.json) writes and reads them
            if isinstance(d[key], Mapping):
                d[key] = {str(b): v for b, v in d[key].items()}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def identity(self) -> dict[str, Any]:
        d = self.to_dict()
        for operational in OPERATIONAL:
            d.pop(operational)
        d["config"] = {section: legacy_identity(section, dict(values)) for section, values in d["config"].items()}
        return d

    def study_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:12]

    # -- the grid ----------------------------------------------------------------------------

    def space(self, optimizer: str) -> SearchSpace:
        """The reference space of this optimizer and schedule, with the spec's overrides."""
        base = reference_space(optimizer, self.schedule).to_dict()
        searchable = set(reference_space("momentum", self.schedule).names)
        unknown = set(self.search) - searchable
        if unknown:
            raise ConfigError(
                f"study spec: search names {', '.join(sorted(unknown))}, not searched with schedule {self.schedule} "
                f"(searched: {', '.join(sorted(searchable))})"
            )
        merged = {name: dict(self.search.get(name, spec)) for name, spec in base.items()}
        return SearchSpace.from_dict({name: spec for name, spec in merged.items() if "value" not in spec})

    def fixed(self, optimizer: str) -> dict[str, float]:
        """The metaparameters the spec holds at one value (``momentum: {value: 0.9}``) instead of searching."""
        searched = set(reference_space(optimizer, self.schedule).names)
        fixed = {name: spec for name, spec in self.search.items() if name in searched and "value" in spec}
        for name, spec in fixed.items():
            if set(spec) != {"value"} or not isinstance(spec["value"], (int, float)) or isinstance(spec["value"], bool):
                raise ConfigError(f"study spec: search entry {name!r} is either {{value: x}} or {{range: [low, high], scale: ...}}")
        return {name: float(spec["value"]) for name, spec in fixed.items()}

    def lr_factor(self, batch_size: int) -> float:
        """What ``lr_scaling`` multiplies a point's learning rate by at this batch size (1 without it):
        the linear scaling rule from the reference batch size, held constant above ``up_to``."""
        if self.lr_scaling is None:
            return 1.0
        return min(batch_size, self.lr_scaling["up_to"]) / self.lr_scaling["reference"]

    def per_batch(self, key: str, batch_size: int) -> int:
        """``max_steps`` or ``eval_every`` at this batch size."""
        value = getattr(self, key)
        return value[batch_size] if isinstance(value, Mapping) else value

    def points(self, optimizer: str) -> list[dict[str, float | int]]:
        """The trials' metaparameters; the same list for every sparsity and batch size."""
        points = self.space(optimizer).points(self.trials, skip=self.sobol_skip, seed=self.sobol_seed)
        return [{**point, **self.fixed(optimizer)} for point in points]

    def methods(self) -> tuple[str | None, ...]:
        """The grid's pruning methods; (None,): the one its config names (SNIP by default)."""
        return self.prune_methods or (None,)

    def trial_config(self, optimizer: str, sparsity: float, batch_size: int, trial_id: int,
                     point: Mapping[str, float | int] | None = None, method: str | None = None) -> Config:
        sections: dict[str, dict[str, Any]] = {k: dict(v) for k, v in self.config.items()}

        def put(section: str, **values: Any) -> None:
            sections.setdefault(section, {}).update(values)

        put("data", dataset=self.dataset, data_dir=self.data_dir)
        put("model", model=self.model)
        put("prune", sparsity=sparsity, **({"prune_method": method} if method else {}))
        point = dict(point or {})
        if "lr" in point:
            point["lr"] = point["lr"] * self.lr_factor(batch_size)
        put("optim", optimizer=optimizer, schedule=self.schedule, **point)
        put("train", batch_size=batch_size, max_steps=self.per_batch("max_steps", batch_size),
            eval_every=self.per_batch("eval_every", batch_size),
            goal_error=self.goal_error, seed=self.seed + trial_id)
        put("run", progress=False, checkpoint=True, strict_world_size=self.strict_world_size, save_model=self.save_model)
        return Config.from_dict(sections)


@dataclass(frozen=True)
class Trial:
    index: int  # position in the canonical order of the grid
    optimizer: str
    sparsity: float
    batch_size: int
    trial_id: int
    params: dict[str, float | int]
    config: Config
    method: str | None = None  # the grid's pruning method (None: the spec has no prune_methods axis)

    def relpath(self) -> Path:
        c = self.config
        method = Path(self.method) if self.method else Path()
        return (Path(c.data.dataset) / c.model.model / self.optimizer / method / f"sparsity-{exact(self.sparsity)}"
                / f"batch-{self.batch_size}" / f"trial-{self.trial_id:03d}.h5")

    def label(self) -> str:
        method = f" {self.method}" if self.method else ""
        return f"{self.optimizer}{method} sparsity={exact(self.sparsity)} batch={self.batch_size} trial={self.trial_id}"

    def cell(self) -> "CellKey":
        """The cell: the trials that share everything but their metaparameters (capping, fusing, order)."""
        return (self.optimizer, self.method or "", self.sparsity, self.batch_size)

    def attrs(self, spec: StudySpec) -> dict[str, Any]:
        return {"study_name": spec.name, "study_hash": spec.study_hash(), "trial_id": self.trial_id,
                "search_params": json.dumps(self.params, sort_keys=True)}


SPEC_MAX_BYTES = 1 << 20
SPEC_MAX_NODES = 10_000  # values in the spec with its YAML aliases expanded (a real spec has about a hundred)


def bounded_yaml(text: str) -> Any:
    """``yaml.safe_load`` of a study spec, refusing (ValueError) a text over 1 MiB or one whose aliases
    would expand to more than SPEC_MAX_NODES values: anchors nested in anchors ("billion laughs")
    grow exponentially, and everything downstream (validation, hashing, error messages) walks the
    expanded value. The size is counted on the composed nodes, before anything is expanded."""
    if len(text) > SPEC_MAX_BYTES:
        raise ValueError(f"over the {SPEC_MAX_BYTES} characters a spec may have")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        sizes: dict[int, float] = {}

        def size(n: yaml.Node) -> float:
            if id(n) not in sizes:
                sizes[id(n)] = math.inf  # a node that contains itself expands for ever
                children = [c for pair in n.value for c in pair] if isinstance(n, yaml.MappingNode) else (
                    n.value if isinstance(n, yaml.SequenceNode) else [])
                sizes[id(n)] = 1 + sum(size(c) for c in children)
            return sizes[id(n)]

        if size(node) > SPEC_MAX_NODES:
            raise ValueError(f"its YAML aliases (*name) expand to over {SPEC_MAX_NODES} values; write the values out")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def grid(spec: StudySpec) -> list[Trial]:
    """Every trial of the study, in the canonical order: optimizer, pruning method, sparsity, batch size,
    trial id."""
    trials = []
    for optimizer in spec.optimizers:
        points = spec.points(optimizer)
        for method in spec.methods():
            for sparsity in spec.sparsities:
                for batch_size in spec.batch_sizes:
                    for trial_id, point in enumerate(points):
                        cfg = spec.trial_config(optimizer, sparsity, batch_size, trial_id, point, method)
                        trials.append(Trial(len(trials), optimizer, sparsity, batch_size, trial_id, dict(point), cfg,
                                            method))
    return trials


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise ConfigError(f"--shard {text}: need 0 <= i < n")
    return i, n


def shard(trials: Sequence[Trial], i: int, n: int) -> list[Trial]:
    """Shard i of n: the trials whose grid index is i modulo n (n shards partition the grid)."""
    return [t for t in trials if t.index % n == i]


# -- the study directory ---------------------------------------------------------------------


def study_dir(spec: StudySpec, out: str | Path) -> Path:
    return Path(out) / f"{spec.name}-{spec.study_hash()}"


def _differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [k for k in keys if saved.get(k) != current.get(k)]


def create_once(path: Path, text: str) -> None:
    """Write ``path`` whole unless it exists: through a temporary file linked into place, so it appears
    complete and never replaces what another job (array jobs and shards start together) wrote first."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def prepare_dir(spec: StudySpec, directory: Path) -> None:
    """Create the study directory with its spec, or check that it holds this very spec."""
    saved_path = directory / SPEC_FILE
    if not saved_path.exists():
        try:
            directory.mkdir(parents=True, exist_ok=True)
            record = {"spec": spec.to_dict(), "study_hash": spec.study_hash(),
                      "hvd_sparse_version": hvd_sparse.__version__, "created": time.time()}
            create_once(saved_path, json.dumps(record, indent=2, sort_keys=True) + "\n")  # else: check its spec below
        except OSError as e:
            raise unwritable(e, f"{directory}: cannot create the study directory: {e.strerror or e}", ConfigError) from None
    try:
        saved = json.loads(regular_bytes(saved_path))["spec"]
        for operational in OPERATIONAL:
            saved.pop(operational, None)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{saved_path}: unreadable study spec ({type(e).__name__}); not touching this directory") from None
    diff = _differences(saved, spec.identity())
    if diff:
        raise ConfigError(
            f"{directory} holds a different study (spec differs in: {', '.join(diff)}); "
            "use another --out or --study-dir, or restore the original spec"
        )
    check_writable(directory, "study directory")


@dataclass(frozen=True)
class Outcome:
    trial: Trial
    action: str  # ran, resumed, skipped (ended before), adopted (ended in an earlier version), busy (another process runs it)
    status: str
    steps_to_result: int | None
    best_val_error: float
    seconds: float


def ended_result(path: Path, trial: Trial, spec: StudySpec) -> tuple[str, int | None, float] | None:
    """(status, steps-to-result, best error) of a trial whose log says it ended; None if it still needs
    running. LogError for a corrupt log, or one that another study or trial wrote (never counted)."""
    if not path.exists():
        return None
    log = read_log(path, with_mask=False)  # a corrupt log is a LogError: reported, never overwritten
    expected = {"study_hash": spec.study_hash(), "trial_id": trial.trial_id, "run_hash": trial.config.run_hash()}
    differ = [key for key, value in expected.items() if log.attrs.get(key) != value]
    if differ:
        raise LogError(f"{path}: this log belongs to another study or trial (its {', '.join(differ)} differ), so "
                       "this study will not count it; move it away, or give this study another --out")
    if log.status == "RUNNING" or (log.status == "CAPPED" and not spec.capping):  # without capping: resumed
        return None
    return log.status, log.steps_to_result, float(log.attrs.get("best_val_error", math.nan))


def earlier_versions(spec: StudySpec, directory: Path) -> list[Path]:
    """The folders beside ``directory`` that hold this study's name under another hash: the same study
    before its spec changed (batch sizes added, a budget raised), newest first."""
    def is_version(p: Path) -> bool:
        suffix = p.name[len(spec.name) + 1:]
        return (p.name.startswith(spec.name + "-") and len(suffix) == 12 and all(c in "0123456789abcdef" for c in suffix)
                and p != directory and (p / SPEC_FILE).is_file())
    try:
        found = [p for p in directory.parent.iterdir() if is_version(p)]
    except OSError:
        return []
    return sorted(found, key=lambda p: (p / SPEC_FILE).stat().st_mtime, reverse=True)


def adoptable(source: Path, trial: Trial, spec: StudySpec, fingerprint: str) -> tuple[str, int | None, float] | None:
    """(status, steps-to-result, best error) of an earlier version's log of this very trial: the same
    study name and trial id, the same training (run hash) on the same data, ended. None otherwise."""
    if not source.is_file():
        return None
    try:
        log = read_log(source, with_mask=False)
    except LogError:
        return None  # never adopt a damaged log: the trial runs again
    a = log.attrs
    same = (a.get("study_name") == spec.name and a.get("trial_id") == trial.trial_id
            and a.get("run_hash") == trial.config.run_hash() and a.get("data_fingerprint", fingerprint) == fingerprint)
    if not same or log.status == "RUNNING" or (log.status == "CAPPED" and not still_capped(source, log, trial, spec)):
        return None
    return log.status, log.steps_to_result, float(a.get("best_val_error", math.nan))


def still_capped(source: Path, log: LogData, trial: Trial, spec: StudySpec) -> bool:
    """Whether an earlier version's CAPPED log is this study's result too: this study runs capped, and
    the trial that set the bound is in it as the same training and ended COMPLETE at that bound in the
    earlier version (so it is adopted too, and bounds this trial the same way). Otherwise the trial
    runs here again."""
    by, bound = int(log.attrs.get("capped_by", -1)), log.attrs.get("capping_bound")
    if not spec.capping or not 0 <= by < spec.trials:
        return False
    point = spec.points(trial.optimizer)[by]
    run_hash = spec.trial_config(trial.optimizer, trial.sparsity, trial.batch_size, by, point, trial.method).run_hash()
    try:
        capper = read_log(source.with_name(f"trial-{by:03d}.h5"), with_mask=False)
    except (LogError, OSError):
        return False
    return (capper.attrs.get("run_hash") == run_hash and capper.status == "COMPLETE"
            and capper.steps_to_result == bound)


def adopt(directory: Path, trial: Trial, spec: StudySpec, fingerprint: str) -> tuple[str, int | None, float] | None:
    """Copy an ended log of this trial from an earlier version of the study into ``directory``, under
    this study's identity (``adopted_from`` names the source); its result is the one a run here would
    give, as the training is the same. None when no earlier version holds one."""
    for earlier in earlier_versions(spec, directory):
        source = earlier / trial.relpath()
        ended = adoptable(source, trial, spec, fingerprint)
        if ended is not None:
            target = directory / trial.relpath()
            # a CAPPED trial's checkpoint (--no-capping resumes it) and the final weights (--save-model), before
            # the log that says the trial ended appears
            for companion in (checkpoint_path, final_model_path):
                if companion(source).exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    write_atomically(companion(target), lambda tmp: shutil.copyfile(companion(source), tmp),
                                     "an adopted trial's file")
            copy_log(source, target, {**trial.attrs(spec), "adopted_from": str(source)})
            return ended
    return None


def decide(directory: Path, lock: Any, trial: Trial, spec: StudySpec, fingerprint: str) -> tuple:
    """Rank 0's plan for one trial, as plain data (it is broadcast; a class defined in ``__main__``
    would arrive on the other ranks as a different class): ("skipped" or "adopted", status, steps,
    best), ("busy",), ("resume",) or ("run",). Takes the trial's lock for "resume" and "run"."""
    if not lock.try_acquire():  # the lock first: a trial another job ends meanwhile is not run again
        return ("busy",)
    path = directory / trial.relpath()
    try:
        ended = ended_result(path, trial, spec)
        adopted = adopt(directory, trial, spec, fingerprint) if ended is None and not path.exists() else None
    except Exception:
        lock.release()
        raise
    if ended is not None or adopted is not None:
        lock.release()
        return ("skipped", *ended) if ended is not None else ("adopted", *adopted)
    return ("resume",) if path.exists() else ("run",)


def format_outcome(o: Outcome, done: int, total: int) -> str:
    optim = o.trial.config.optim  # the values trained with: lr_scaling's factor applied
    params = " ".join(f"{k}={getattr(optim, k):.4g}" for k in o.trial.params)
    reached = "-" if o.steps_to_result is None else str(o.steps_to_result)
    width = len(str(total))
    return (f"[{done:>{width}}/{total}] {o.trial.label()} {params}: {o.status} steps_to_result={reached} "
            f"best_val_error={o.best_val_error:.4f} ({o.action}, {o.seconds:.1f} s)")


def summary_table(outcomes: Sequence[Outcome]) -> str:
    """The aggregator's steps-to-result table (with regime boundaries) over these trials."""
    rows = [{**config_columns(o.trial.config.to_dict(), o.trial.trial_id), "path": "", "status": o.status,
             "best_val_error": o.best_val_error,
             "steps_to_result": math.nan if o.steps_to_result is None else o.steps_to_result} for o in outcomes]
    studies = study_table(pd.DataFrame(rows)) if rows else pd.DataFrame()
    return format_studies(studies, curve_table(studies)) if len(studies) else "no trial of this shard has ended"


# -- running -----------------------------------------------------------------------------------


DATA_FILE = "data.json"


def check_study_data(directory: Path, fingerprint: str) -> None:
    """The study's trials all train on one dataset: the first run records the data's SHA-256 in the
    study directory, and a later run on other data (its data_dir changed, a file replaced) is refused
    before any trial, as its new trials would sit beside the ended ones in one table."""
    path = directory / DATA_FILE
    if not path.exists():  # a study from before the record: its trials' logs say what they were trained on
        logged = next((str(a) for a in (_logged_fingerprint(p) for p in directory.rglob("trial-*.h5")) if a), fingerprint)
        try:
            create_once(path, json.dumps({"data_fingerprint": logged}))  # the first job's record; the others read it
        except OSError as e:
            raise unwritable(e, f"{path}: cannot write the data record: {e.strerror or e}", ConfigError) from None
    try:
        recorded = str(json.loads(regular_bytes(path))["data_fingerprint"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: unreadable data record ({type(e).__name__}); not touching this directory") from None
    if recorded != fingerprint:
        raise ConfigError(f"{directory}: this study's trials were trained on other data (SHA-256 {recorded[:12]}, now "
                          f"{fingerprint[:12]}); point data_dir back to that data, or give this study another --out")


def _logged_fingerprint(log: Path) -> str:
    try:
        return str(read_log(log, with_mask=False).attrs.get("data_fingerprint", ""))
    except LogError:
        return ""


def run_study(spec: StudySpec, directory: Path, shard_of: tuple[int, int] = (0, 1), verbose: bool = False,
              pack: int = 1, backend: str = "auto") -> list[Outcome]:
    """Run this shard's trials of the study inside the current Horovod job; rank 0 prints progress.

    ``pack`` > 1 splits the job into that many groups of ranks, each running its own share of the
    trials (``dist.init``); world rank 0 prints the table of all of them at the end. Returns the
    outcomes of this rank's group.
    """
    everything = grid(spec)
    for optimizer, method in itertools.product(spec.optimizers, spec.methods()):  # registries; the data folder
        validate(next(t.config for t in everything if (t.optimizer, t.method) == (optimizer, method)))
    trials = shard(everything, *shard_of)
    dist.init(pack, backend)
    if spec.fuse > 1:  # after init: the checks that depend on the world size see this one
        check_fusable(everything[0].config)
    group, groups = dist.group()
    configure_logging("info" if verbose else "warning", dist.is_root())
    for t in everything:
        check_batch(t.config)
    dist.world_verify_same(f"{spec.study_hash()} shard {shard_of} pack {pack} fuse {spec.fuse} capping {spec.capping} "
                           f"plug-ins {plugin_digest()}", "study spec, shard, --pack, --fuse, --capping and plug-ins")
    dist.on_root(lambda: prepare_dir(spec, directory), "preparing the study directory")
    data = load_data_everywhere(everything[0].config, select_device())
    dist.on_root(lambda: check_study_data(directory, data.fingerprint), "checking the study's data")
    if dist.world_is_root():
        packing = "" if groups == 1 else f" as {groups} groups of {dist.size()} running trials side by side"
        packing += f", {spec.fuse} trials of a cell fused" if spec.fuse > 1 else ""
        say(f"study {directory} ({len(trials)} trials{'' if shard_of == (0, 1) else f', shard {shard_of[0]}/{shard_of[1]}'}"
            f", world size {dist.size() * groups}{packing})")

    outcomes = run_trials(spec, directory, trials, data, group, groups, cell_records(directory, everything))
    try:
        everyone = dist.world_gather(outcomes if dist.is_root() else [], give_up=stop_requested)
    except dist.GaveUp:
        raise Interrupted(f"a stop signal came while group {group} waited for the other groups; all its trials "
                          "had ended") from None
    if dist.world_is_root():
        say(summary_table([o for part in everyone or [] for o in part]))
    return outcomes


CellKey = tuple[str, str, float, int]  # optimizer, pruning method ('' without the axis), sparsity, batch size


def cell_records(directory: Path, everything: Sequence[Trial]) -> dict[CellKey, CellRecord]:
    """Every cell's record of its ended trials (hvd_sparse.capping), over the whole grid (all shards)."""
    hashes: dict[CellKey, dict[int, str]] = {}
    folders: dict[CellKey, Path] = {}
    for t in everything:
        key = t.cell()
        hashes.setdefault(key, {})[t.trial_id] = t.config.run_hash()
        folders[key] = directory / t.relpath().parent
    return {key: CellRecord(folders[key], hashes[key]) for key in hashes}


def cell_order(cell: Sequence[Trial], records: Mapping[CellKey, CellRecord]) -> list[Trial]:
    """The cell's trials best first: the best trial of the nearest batch size already measured (same
    optimizer, pruning method and sparsity), then the others in trial order (hvd_sparse.capping.best_first)."""
    first = cell[0]
    neighbours = {key[-1]: record.bound() for key, record in records.items()
                  if key[:-1] == first.cell()[:-1] and key[-1] != first.batch_size}
    by_id = {t.trial_id: t for t in cell}
    return [by_id[i] for i in best_first([t.trial_id for t in cell], first.batch_size, neighbours)]


def run_trials(spec: StudySpec, directory: Path, trials: Sequence[Trial], data: Any, group: int, groups: int,
               records: Mapping[CellKey, CellRecord]) -> list[Outcome]:
    """This group's trials, cell by cell (``spec.fuse`` of a cell at a time), with rank 0 printing
    each as it ends. One group runs them all in order. Packed groups take the next trial that no
    group has taken (its lock says so), so a group that drew cheap trials goes on to others rather
    than waiting for the slowest group at the end; a trial that had ended before the job started is
    reported by one group only. Every group's list of those is shared before any group runs a trial
    (a world allgather): a list made after another group had adopted or ended a trial would report
    that trial twice."""
    prefix = "" if groups == 1 else f"group {group}: "
    ended_before = set() if groups == 1 else set().union(*dist.world_allgather(dist.root_decides(
        lambda: [t.index for t in trials if ended_result(directory / t.relpath(), t, spec) is not None],
        "listing ended trials"), "ended trials"))
    outcomes: list[Outcome] = []

    def report(outcome: Outcome) -> None:
        index = outcome.trial.index
        if groups > 1 and index not in ended_before and outcome.action in ("busy", "skipped"):
            return  # another group of this job has it, or just ended it
        outcomes.append(outcome)
        if dist.is_root():
            say(prefix + format_outcome(outcome, len(outcomes), len(trials)))

    mine = [t for t in trials if t.index not in ended_before or t.index % groups == group]
    for key, cell in itertools.groupby(mine, key=Trial.cell):
        cell = list(cell)
        if spec.capping:
            ids = dist.root_decides(lambda: [t.trial_id for t in cell_order(cell, records)], "ordering a cell")
            cell = sorted(cell, key=lambda t: ids.index(t.trial_id))
        run_cell(spec, directory, cell, data, report, records[key])
    return outcomes


def run_cell(spec: StudySpec, directory: Path, cell: Sequence[Trial], data: Any, report: Callable[[Outcome], None],
             record: CellRecord) -> None:
    """The trials of one cell on every rank of this group, ``spec.fuse`` at a time (``Engine``): each
    is skipped if it ended, left alone if another job runs it, else run (or resumed) under its lock.
    Rank 0 records each ended trial in the cell's record (before its lock is released), which bounds
    the others under capping."""
    pending = iter(cell)
    running: dict[Path, tuple[Trial, RunLock, str, float]] = {}

    def next_job() -> Job | None:
        for trial in pending:
            path = directory / trial.relpath()
            lock = RunLock(path)
            decision = dist.root_decides(lambda: decide(directory, lock, trial, spec, data.fingerprint), "deciding a trial")
            if decision[0] in ("skipped", "adopted"):
                if dist.is_root():
                    record.record(trial.trial_id, decision[1], decision[2])
                report(Outcome(trial, *decision, 0.0))
            elif decision[0] == "busy":
                report(Outcome(trial, "busy", "RUNNING", None, math.nan, 0.0))
            else:
                if dist.is_root():
                    record.forget(trial.trial_id)
                running[path] = (trial, lock, "resumed" if decision[0] == "resume" else "ran", time.time())
                return Job(trial.config, path, trial.attrs(spec), bound=record.bound if spec.capping else None,
                           reopen_capped=not spec.capping)
        return None

    def ended(job: Job, result: TrialResult) -> None:
        trial, lock, action, t0 = running.pop(job.path)
        if dist.is_root():
            record.record(trial.trial_id, result.status, result.steps_to_result)
        lock.release()
        report(Outcome(trial, action, result.status, result.steps_to_result, result.best_val_error, time.time() - t0))

    try:
        Engine(data, spec.fuse, next_job, ended).run()
    finally:
        for _, lock, _, _ in running.values():
            lock.release()


def list_trials(spec: StudySpec, directory: Path, trials: Sequence[Trial]) -> None:
    """Print the study's trials (this shard's) and where their logs go, without running anything."""
    lines = [f"study {directory}: {len(trials)} trials"]
    for t in trials:
        params = " ".join(f"{k}={v:.6g}" for k, v in t.params.items())
        lines.append(f"{t.index:>5} {t.label()} seed={t.config.train.seed} {params} -> {t.relpath()}")
    say("\n".join(lines))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="study spec, YAML or JSON (see studies/mini-mnist5k.yaml)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", default="runs", help="root folder; the study goes to OUT/<name>-<hash> (default: runs)")
    where.add_argument("--study-dir", help="use exactly this study directory instead of OUT/<name>-<hash>")
    parser.add_argument("--shard", default="0/1", help="run only shard i of n of the grid (i/n, e.g. a SLURM array task)")
    parser.add_argument("--data-dir", help="root folder of the dataset files (overrides the spec's data_dir)")
    parser.add_argument("--list", action="store_true", help="print the trials and their log paths, run nothing")
    parser.add_argument("--print-dir", action="store_true", help="print the study directory, run nothing")
    parser.add_argument("--pack", type=int, default=1, metavar="G",
                        help="split the job's ranks into G groups, each running its own trials side by side "
                             "(np=2 --pack 2: two single-rank trials at a time); for trials too small to scale")
    parser.add_argument("--fuse", type=int, metavar="T",
                        help="train T trials of a cell (same optimizer, sparsity, batch size) at a time as one fused model, "
                             "one allreduce for all (overrides the spec's fuse; default 1); for GPUs, where small trials "
                             "leave the device idle")
    parser.add_argument("--capping", action=argparse.BooleanOptionalAction, default=None,
                        help="stop a trial once it can no longer beat the fewest steps-to-result its cell has found "
                             "(status CAPPED; the study's answer is the same); --no-capping runs every trial to its "
                             "budget, resuming capped ones, for the full metaparameter landscape (overrides the spec's "
                             "capping; default true)")
    parser.add_argument("--strict-world-size", action="store_true", default=None,
                        help="refuse to resume a trial at another world size than it was interrupted at (a resume at "
                             "another is the same optimization only up to float summation order; by default it is "
                             "said and recorded in the log's world_sizes)")
    parser.add_argument("--save-model", action="store_true", default=None,
                        help="save each trial's final parameters beside its log (<log>.final.pt)")
    parser.add_argument("--backend", default="auto", choices=("auto", "horovod", "torch"),
                        help="distributed engine (default: from the launch: torchrun -> torch, horovodrun/mpirun/srun -> horovod)")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_FILE",
                        help=PLUGIN_HELP + " (after the spec's plugins)")
    parser.add_argument("--verbose", action="store_true", help="log every evaluation of every trial (rank 0)")
    return parser.parse_args(list(sys.argv[1:] if argv is None else argv))


def main(argv: Sequence[str] | None = None) -> int:
    return guarded(lambda: study_main(argv), PROG)


def study_main(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    spec = StudySpec.load(args.spec)
    load_plugins([*spec.plugins, *args.plugin])
    if args.data_dir:
        spec = dataclasses.replace(spec, data_dir=args.data_dir)
    if args.fuse is not None:
        spec = dataclasses.replace(spec, fuse=args.fuse)
    if args.capping is not None:
        spec = dataclasses.replace(spec, capping=args.capping)
    if args.strict_world_size:
        spec = dataclasses.replace(spec, strict_world_size=True)
    if args.save_model:
        spec = dataclasses.replace(spec, save_model=True)
    directory = Path(args.study_dir) if args.study_dir else study_dir(spec, args.out)
    shard_of = parse_shard(args.shard)
    if args.print_dir:
        say(str(directory))
    elif args.list:
        list_trials(spec, directory, shard(grid(spec), *shard_of))
    else:
        run_study(spec, directory, shard_of, verbose=args.verbose, pack=args.pack, backend=args.backend)
    return 0


if __name__ == "__main__":
    sys.exit(main())
