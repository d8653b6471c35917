"""From a folder of trial logs to the paper's scaling curves: tables, regimes and plots.

    python -m hvd_sparse.aggregate RUNS_DIR --out OUT_DIR [--max-trials 100]

Every ``*.h5`` trial log under RUNS_DIR becomes one row of a tidy table (``trials.csv``). A *study*
is one (dataset, model, optimizer, schedule, goal error, sparsity, batch size); its steps-to-result
is the minimum over its COMPLETE trials (``studies.csv``). A *curve* is steps-to-result against batch
size for one workload and sparsity; ``curves.csv`` holds its regime boundaries:

- the curve is first smoothed by the shape the theory gives it (``scaling_fit``): on log2-log2 axes,
  a least-squares fit whose slope starts at -1 or above (nothing scales better than perfectly) and
  only rises from one batch size to the next (returns only diminish). Measured steps-to-result carry
  the noise of a finite search and of evaluating at intervals; the rules read the fitted curve;
- critical batch size: the largest batch size B_k such that every batch size up to it needs at most
  ``(1 + tolerance)`` times the steps of perfect scaling from the smallest one, S_0 * B_0 / B_j;
- diminishing-returns (maximal useful) batch size: the first B_k from which going to the next batch
  size saves less than ``min_saving`` of the steps per doubling, 1 - (S_k+1 / S_k) ** (1 / log2(B_k+1 / B_k));
  on the fitted curve the saving only falls with B, so no larger batch size saves more.

Aggregation is a pure function of the trials table; ``hvd_sparse.plots`` draws what it computed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from hvd_sparse.cli import ArgumentParser, error_line, say
from hvd_sparse.log import LogError, read_log

PROG = "hvd_sparse.aggregate"
WORKLOAD = ["dataset", "model", "pruning", "optimizer", "schedule", "goal_error"]
CURVE = WORKLOAD + ["sparsity"]
STUDY = CURVE + ["batch_size"]
ENDED = ("COMPLETE", "INCOMPLETE", "INFEASIBLE", "CAPPED")


class AggregateError(ValueError):
    """Nothing to aggregate (no folder, no logs); reported as one line."""


@dataclass(frozen=True)
class Rules:
    """The regime rules' thresholds (see the module docstring)."""

    tolerance: float = 0.25  # departure from perfect scaling that ends the linear regime
    min_saving: float = 0.10  # saving per doubling below which returns have diminished


# -- reading ---------------------------------------------------------------------------------------


def config_columns(cfg: Mapping[str, Mapping[str, Any]], trial_id: int) -> dict:
    """The table's columns that come from a trial's configuration (``Config.to_dict()`` form) and
    its trial id; metaparameters an optimizer or schedule does not use are NaN."""
    data, model, prune, optim, train = cfg["data"], cfg["model"], cfg["prune"], cfg["optim"], cfg["train"]
    has_momentum = optim["optimizer"] in ("momentum", "nesterov")
    return {
        "dataset": data["dataset"], "model": model["model"], "pruning": pruning_label(prune), "optimizer": optim["optimizer"],
        "schedule": optim["schedule"], "goal_error": float(train["goal_error"]),
        "sparsity": float(prune["sparsity"]), "batch_size": int(train["batch_size"]),
        "trial_id": trial_id, "seed": int(train["seed"]),
        "lr": float(optim["lr"]), "momentum": float(optim["momentum"]) if has_momentum else math.nan,
        "decay_steps": int(optim["decay_steps"]) if optim["schedule"] == "linear" else math.nan,
        "end_factor": float(optim["end_factor"]) if optim["schedule"] == "linear" else math.nan,
        "max_steps": int(train["max_steps"]), "eval_every": int(train["eval_every"]),
        "precision": train.get("precision", "fp32"), "memory_format": train.get("memory_format", "contiguous"),
    }


def pruning_label(prune: Mapping[str, Any]) -> str:
    """How a trial was pruned, in a few characters: the method, then what is not at its default
    (``random/layerwise``, ``magnitude 2:4``, ``snip x10``); logs from before 0.5.0 say ``snip``."""
    label = prune.get("prune_method", "snip")
    if prune.get("prune_scope", "global") != "global":
        label += f"/{prune['prune_scope']}"
    if prune.get("prune_iterations", 0):
        label += f" x{prune['prune_iterations']}"
    if prune.get("prune_structure", ""):
        label += f" {prune['prune_structure']}"
    return label


def _unless_snip(pruning: str) -> str:
    """`` <pruning>`` for a workload's line, nothing for SNIP (the tables of every earlier study read as before)."""
    return "" if pruning == "snip" else f" {pruning}"


def trial_row(path: Path, root: Path) -> dict:
    """One log as one flat row; LogError if it is not a readable trial log."""
    log = read_log(path, with_mask=False)
    try:
        cfg = log.config
        columns = config_columns(cfg, int(log.attrs.get("trial_id", -1)))
    except (ValueError, KeyError, TypeError):
        raise LogError(f"{path}: its config attribute is not a trial config") from None
    m = log.measurements
    reached = log.steps_to_result
    return {
        "path": str(path.relative_to(root)),
        "study": log.attrs.get("study_name", ""),
        "study_hash": log.attrs.get("study_hash", ""),
        "run_hash": str(log.attrs.get("run_hash", "")),
        **columns,
        "status": log.status,
        "steps_to_result": math.nan if log.steps_to_result is None else log.steps_to_result,
        "capping_bound": int(log.attrs.get("capping_bound", -1)),  # CAPPED: the bound it met, and from which trial
        "capped_by": int(log.attrs.get("capped_by", -1)),
        "best_val_error": float(np.min(m["val_error"])) if len(m.get("val_error", [])) else math.nan,
        "evaluations": int(len(m.get("step", []))),
        "steps_done": int(m["step"][-1]) if len(m.get("step", [])) else 0,
        "wall_time": float(m["wall_time"][-1]) if len(m.get("wall_time", [])) else math.nan,
        "world_size": int(log.attrs["world_size"]),
        "world_sizes": world_sizes(path, log.attrs),
        "density": float(log.attrs.get("mask_density", math.nan)),
        "grad_compression": cfg.get("dist", {}).get("grad_compression", "none"),
        "noise_at_result": noise_at(m, reached) if reached is not None else math.nan,
        "lipschitz_at_result": lipschitz_near(log.lipschitz, reached) if reached is not None else math.nan,
        "lipschitz_last": float(log.lipschitz["value"][-1]) if len(log.lipschitz.get("value", [])) else math.nan,
    }


def world_sizes(path: Path, attrs: Mapping[str, Any]) -> str:
    """Every world size the trial ran at, in order ("2 1": interrupted at 2, resumed at 1)."""
    try:
        return " ".join(str(int(n)) for n in json.loads(attrs.get("world_sizes", f"[{int(attrs['world_size'])}]")))
    except (ValueError, TypeError):
        raise LogError(f"{path}: its world_sizes attribute is not a list of world sizes") from None


def noise_at(measurements: Mapping[str, np.ndarray], step: int) -> float:
    """The smoothed noise scale B_simple logged at ``step`` (NaN if it was not measured)."""
    steps, noise = measurements.get("step", np.array([])), measurements.get("noise_scale", np.array([]))
    found = np.flatnonzero(steps[: len(noise)] == step)
    return float(noise[found[0]]) if len(found) else math.nan


def lipschitz_near(lipschitz: Mapping[str, np.ndarray], step: int) -> float:
    """The last Lipschitz measurement at or before ``step``, else the first after it; NaN if none."""
    steps = lipschitz.get("step", np.array([]))
    if not len(steps):
        return math.nan
    before = np.flatnonzero(steps <= step)
    return float(lipschitz["value"][before[-1] if len(before) else 0])


def base_folder(roots: Sequence[str | Path]) -> Path:
    """The folder the trials' paths are relative to: the one root, or the common parent of several."""
    return Path(roots[0]) if len(roots) == 1 else Path(os.path.commonpath([Path(r).absolute() for r in roots]))


def read_trials(roots: str | Path | Sequence[str | Path]) -> tuple[pd.DataFrame, list[str]]:
    """Every trial log under the folder(s) ``roots`` as a table (paths relative to ``base_folder``), and
    one line per file that could not be used."""
    roots = [Path(roots)] if isinstance(roots, (str, Path)) else [Path(r) for r in roots]
    base = base_folder(roots)
    root = roots[0] if len(roots) == 1 else ", ".join(map(str, roots))  # for messages
    paths = []
    for folder in roots:
        if not folder.is_dir():
            raise AggregateError(f"{folder}: no such folder")
        paths += sorted(p for p in folder.rglob("*.h5") if not p.name.endswith(".tmp"))
    if not paths:
        raise AggregateError(f"{root}: no trial logs (*.h5) found")
    if len(roots) > 1:  # folders named twice or nested: each log once
        paths, base = sorted({p.absolute() for p in paths}), base.absolute()
    rows, problems = [], []
    for path in paths:
        try:
            rows.append(trial_row(path, base))
        except LogError as e:
            problems.append(f"skipped {e}")
    table = pd.DataFrame(rows)
    if table.empty:
        raise AggregateError(f"{root}: none of the {len(paths)} *.h5 files is a readable trial log")
    table, copies = without_copies(table)
    problems += copies
    check_one_study_per_cell(table, root)
    resized = table[table.world_sizes.map(lambda s: len(set(s.split())) > 1)]
    if len(resized):
        problems.append(f"{len(resized)} trial(s) resumed at another world size than they were interrupted at (the same "
                        "optimization only up to float summation order; column world_sizes): "
                        + ", ".join(resized.path.head(3)) + (" ..." if len(resized) > 3 else ""))
    running = table[table.status == "RUNNING"]
    if len(running):
        problems.append(f"{len(running)} trial(s) still running or interrupted (status RUNNING), not counted: "
                        + ", ".join(running.path.head(3)) + (" ..." if len(running) > 3 else ""))
    mixed = table.groupby(STUDY)[["max_steps", "eval_every"]].nunique().max(axis=1)
    if (mixed > 1).any():
        problems.append(f"{int((mixed > 1).sum())} studies mix trials of different step budgets or evaluation "
                        "intervals (several study directories under one folder?): name the study directories to aggregate")
    goals = sorted(table.goal_error.unique())
    if len(goals) > 1:
        problems.append(f"logs with {len(goals)} goal errors ({', '.join(f'{g:g}' for g in goals)}): "
                        "their studies and curves are kept apart")
    return table.sort_values(STUDY + ["trial_id", "seed", "path"]).reset_index(drop=True), problems


def without_copies(table: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Each trial once: logs of the same study, trial id, training (run hash) and world sizes are copies
    of one trial (a backup of a study folder inside the folder aggregated, a log copied by hand). Logs
    of single runs (no study) are never merged: the same configuration run at np=1 and np=4 is two
    measurements. The copy kept is
    the furthest along (an ended one before a RUNNING one, then the most steps), then the one nearest the
    top of the folder; one line says how many were skipped and shows one."""
    key = ["study_hash", "trial_id", "run_hash", "world_sizes"]
    ranked = table.assign(_ended=table.status != "RUNNING", _depth=table.path.map(lambda p: len(Path(p).parts)))
    ranked = ranked.sort_values(["_ended", "steps_done", "_depth", "path"], ascending=[False, False, True, True])
    copy = ranked.duplicated(key, keep="first") & (ranked.study_hash != "")  # single runs: each log its own
    if not copy.any():
        return table, []
    example = ranked[copy].iloc[0]
    kept = ranked[~copy].set_index(key).path[tuple(example[key])]
    line = (f"skipped {int(copy.sum())} log(s) that are copies of trials already counted (same study, trial id and "
            f"run hash), e.g. {example.path} (a copy of {kept})")
    return table.loc[ranked.index[~copy]].sort_index(), [line]


# -- aggregation: pure functions of the trials table -----------------------------------------------


def check_one_study_per_cell(table: pd.DataFrame, root: str | Path) -> None:
    """AggregateError if two study identities would be merged: one study name with two hashes (its
    spec changed), or trials of two studies in the same cell of the grid. Single runs (no study) may
    share cells: a search by hand."""
    studies = table[table.study_hash != ""]
    hashes = studies.groupby("study").study_hash.unique()
    changed = {name: sorted(h) for name, h in hashes.items() if len(h) > 1}
    if changed:
        name, found = next(iter(changed.items()))
        raise AggregateError(f"{root}: study {name!r} is there with {len(found)} different specs (hashes "
                             f"{', '.join(found)}); aggregate one of them: name its study directory "
                             "(hvd_sparse.study SPEC --print-dir), or several such directories")
    shared = studies.groupby(STUDY).study.unique()
    shared = shared[shared.map(len) > 1]
    if len(shared):
        cell = " ".join(f"{k}={getattr(v, 'item', lambda: v)()}" for k, v in zip(STUDY, shared.index[0]))
        raise AggregateError(f"{root}: the studies {', '.join(sorted(shared.iloc[0]))} both have trials of the cell "
                             f"{cell}; aggregate one of them: name its study directory")


def first_trials(trials: pd.DataFrame, max_trials: int | None) -> pd.DataFrame:
    """The first ``max_trials`` trials (by trial id, whatever their status) of each study, if given."""
    ordered = trials.sort_values(STUDY + ["trial_id", "seed", "path"])
    if max_trials is not None:
        ordered = ordered.groupby(STUDY, sort=False).head(max_trials)
    return ordered


def study_table(trials: pd.DataFrame, max_trials: int | None = None) -> pd.DataFrame:
    """One row per study: trial counts, steps-to-result (min over COMPLETE) and the best trial.

    ``capped_elsewhere`` counts the CAPPED trials whose bound came from a trial not counted here (with
    ``max_trials``): such a trial might have beaten the counted ones, so that study's steps-to-result
    is only an upper bound of what its first trials alone would give.
    """
    rows = []
    considered = first_trials(trials, max_trials)
    running = considered[considered.status == "RUNNING"].groupby(STUDY).size()
    for key, group in considered[considered.status.isin(ENDED)].groupby(STUDY, sort=True):
        counts = group.status.value_counts()
        capped = group[group.status == "CAPPED"]
        by = capped.capped_by if "capped_by" in capped else pd.Series(dtype=int)
        complete = group[group.status == "COMPLETE"].sort_values(["steps_to_result", "trial_id"])
        best = complete.iloc[0] if len(complete) else None
        rows.append({
            **dict(zip(STUDY, key)),
            "trials": len(group), **{s.lower(): int(counts.get(s, 0)) for s in ENDED},
            "running": int(running.get(key, 0)),
            "capped_elsewhere": int((~by.isin(group.trial_id)).sum()),
            "steps_to_result": float(best.steps_to_result) if best is not None else math.nan,
            "best_trial": int(best.trial_id) if best is not None else -1,
            "best_lr": float(best.lr) if best is not None else math.nan,
            "best_momentum": float(best.momentum) if best is not None else math.nan,
            "best_val_error": float(group.best_val_error.min()),
            "best_noise_scale": float(best.get("noise_at_result", math.nan)) if best is not None else math.nan,
            "best_lipschitz": float(best.get("lipschitz_at_result", math.nan)) if best is not None else math.nan,
        })
    studies = pd.DataFrame(rows, columns=STUDY + ["trials", *(s.lower() for s in ENDED), "running", "capped_elsewhere",
                                                  "steps_to_result", "best_trial", "best_lr", "best_momentum",
                                                  "best_val_error", "best_noise_scale", "best_lipschitz"])
    return studies.assign(fitted_steps=fitted_steps(studies))


def fitted_steps(studies: pd.DataFrame) -> pd.Series:
    """Each study's steps-to-result as its curve's ``scaling_fit`` has it (NaN where not reached)."""
    fitted = pd.Series(math.nan, index=studies.index, dtype=float)
    for _, group in studies.groupby(CURVE, sort=False):
        reached = group[np.isfinite(group.steps_to_result) & (group.steps_to_result > 0)].sort_values("batch_size")
        if len(reached):
            fitted[reached.index] = scaling_fit(reached.batch_size, reached.steps_to_result)
    return fitted


def scaling_fit(batch_sizes: Sequence[float], steps: Sequence[float]) -> np.ndarray:
    """The least-squares fit, in log2(steps) against log2(batch size), of a convex curve whose slope is
    -1 or more: u_k = c - (x_k - x_0) + sum_i e_i max(0, x_k - x_i), with e_i >= 0 the slope's rise at
    x_i. ``batch_sizes`` ascending, ``steps`` positive; returns the fitted steps at the same points."""
    x, y = np.log2(np.asarray(batch_sizes, float)), np.log2(np.asarray(steps, float))
    if len(x) < 2:
        return np.asarray(steps, float)
    hinges = np.maximum(0.0, x[:, None] - x[None, :-1])  # column i: max(0, x_k - x_i)
    design = np.column_stack([np.ones_like(x), hinges])
    target = y + (x - x[0])
    from scipy.optimize import lsq_linear  # here: the aggregator's only scipy use, and not on import

    lower = np.r_[-np.inf, np.zeros(len(x) - 1)]
    fit = lsq_linear(design, target, bounds=(lower, np.full(len(x), np.inf)), method="bvls")
    return 2.0 ** (design @ fit.x - (x - x[0]))


def regimes(batch_sizes: Sequence[int], steps: Sequence[float], rules: Rules) -> tuple[float, float]:
    """(critical batch size, diminishing-returns batch size) of one curve; NaN where undetermined.

    Only batch sizes with a finite, positive steps-to-result count; the rules (module docstring) read
    the curve ``scaling_fit`` fits through them.
    """
    points = sorted((int(b), float(s)) for b, s in zip(batch_sizes, steps) if math.isfinite(s) and s > 0)
    if not points:
        return math.nan, math.nan
    sizes = [b for b, _ in points]
    fitted = scaling_fit(sizes, [s for _, s in points])
    b0, s0 = sizes[0], fitted[0]
    critical = float(b0)
    for b, s in zip(sizes, fitted):
        if s > (1 + rules.tolerance) * s0 * b0 / b * (1 + 1e-9):  # 1e-9: the fit's own rounding
            break
        critical = float(b)
    diminishing = math.nan
    for b1, s1, b2, s2 in zip(sizes, fitted, sizes[1:], fitted[1:]):
        if 1 - (s2 / s1) ** (1 / math.log2(b2 / b1)) < rules.min_saving:
            diminishing = float(b1)
            break
    return critical, diminishing


def curve_table(studies: pd.DataFrame, rules: Rules = Rules()) -> pd.DataFrame:
    """One row per (workload, sparsity): its regime boundaries and the points it has."""
    rows = []
    for key, group in studies.groupby(CURVE, sort=True):
        group = group.sort_values("batch_size")
        reached = group[np.isfinite(group.steps_to_result)]
        critical, diminishing = regimes(group.batch_size, group.steps_to_result, rules)
        rows.append({
            **dict(zip(CURVE, key)),
            "batch_sizes": len(group), "reached": len(reached),
            "smallest_batch": int(reached.batch_size.min()) if len(reached) else -1,
            "steps_at_smallest": float(reached.steps_to_result.iloc[0]) if len(reached) else math.nan,
            "critical_batch_size": critical,
            "critical_at_largest": bool(len(reached)) and critical == float(reached.batch_size.max()),
            "diminishing_batch_size": diminishing,
            "tolerance": rules.tolerance, "min_saving": rules.min_saving,
        })
    return pd.DataFrame(rows)


def noise_table(studies: pd.DataFrame, curves: pd.DataFrame) -> pd.DataFrame:
    """Per curve: the noise scale B_simple at the goal (the best trial of each batch size, where it
    reached the goal) summarized as its median over batch sizes, the prediction of the critical batch
    size (McCandlish et al. 2018), beside the critical batch size measured by brute force."""
    rows = []
    for key, group in studies.groupby(CURVE, sort=True):
        values = group.best_noise_scale[np.isfinite(group.best_noise_scale)]
        if values.empty:
            continue
        curve = curve_of(curves, **dict(zip(CURVE, key)))
        measured = float(curve.critical_batch_size) if curve is not None else math.nan
        diminishing = float(curve.diminishing_batch_size) if curve is not None else math.nan
        predicted = float(values.median())
        rows.append({**dict(zip(CURVE, key)), "batch_sizes": len(values), "noise_scale_at_goal": predicted,
                     "noise_scale_min": float(values.min()), "noise_scale_max": float(values.max()),
                     "critical_batch_size": measured, "diminishing_batch_size": diminishing,
                     "predicted_over_measured": predicted / measured if measured > 0 else math.nan,
                     "predicted_over_diminishing": predicted / diminishing if diminishing > 0 else math.nan})
    return pd.DataFrame(rows, columns=CURVE + ["batch_sizes", "noise_scale_at_goal", "noise_scale_min",
                                               "noise_scale_max", "critical_batch_size", "diminishing_batch_size",
                                               "predicted_over_measured", "predicted_over_diminishing"])


def format_noise(noise: pd.DataFrame) -> str:
    """The prediction beside the measurement, one line per curve."""
    if noise.empty:
        return ""
    lines = ["gradient noise scale B_simple at the goal (median over batch sizes of the best trials, and their range)",
             "beside the measured critical and diminishing-returns batch sizes, and the ratios B_simple / measured"]
    lines.append(f"{'workload':<40} {'sparsity':>8} {'B_simple':>9} {'(range)':>9} {'critical':>9} {'ratio':>6} "
                 f"{'diminish':>9} {'ratio':>6}")
    fmt = lambda v, spec: "-" if not math.isfinite(v) else format(v, spec)  # noqa: E731
    for r in noise.itertuples():
        workload = f"{r.dataset} {r.model}{_unless_snip(r.pruning)} {r.optimizer} goal {r.goal_error:g}"
        span = f"{r.noise_scale_min:.0f}-{r.noise_scale_max:.0f}"
        lines.append(f"{workload:<40} {r.sparsity:>8g} {r.noise_scale_at_goal:>9.1f} {span:>9} "
                     f"{fmt(r.critical_batch_size, '.0f'):>9} {fmt(r.predicted_over_measured, '.2f'):>6} "
                     f"{fmt(r.diminishing_batch_size, '.0f'):>9} {fmt(r.predicted_over_diminishing, '.2f'):>6}")
    return "\n".join(lines)


def lipschitz_table(studies: pd.DataFrame) -> pd.DataFrame:
    """Per curve: the Lipschitz constant near the result step of each batch size's best trial,
    summarized as its median over batch sizes (and range), beside the steps-to-result at the smallest
    batch size: the paper's finding is a larger constant, and more steps, at higher sparsity."""
    rows = []
    for key, group in studies.groupby(CURVE, sort=True):
        values = group.best_lipschitz[np.isfinite(group.best_lipschitz)]
        if values.empty:
            continue
        reached = group[np.isfinite(group.steps_to_result)].sort_values("batch_size")
        rows.append({**dict(zip(CURVE, key)), "batch_sizes": len(values), "lipschitz_at_result": float(values.median()),
                     "lipschitz_min": float(values.min()), "lipschitz_max": float(values.max()),
                     "smallest_batch": int(reached.batch_size.iloc[0]) if len(reached) else -1,
                     "steps_at_smallest": float(reached.steps_to_result.iloc[0]) if len(reached) else math.nan})
    return pd.DataFrame(rows, columns=CURVE + ["batch_sizes", "lipschitz_at_result", "lipschitz_min", "lipschitz_max",
                                               "smallest_batch", "steps_at_smallest"])


def format_lipschitz(table: pd.DataFrame) -> str:
    if table.empty:
        return ""
    lines = ["gradient Lipschitz constant near the result step (median over batch sizes of the best trials, and their",
             "range), beside steps-to-result at the smallest batch size",
             f"{'workload':<40} {'sparsity':>8} {'Lipschitz':>10} {'(range)':>13} {'steps':>7} {'at B':>5}"]
    for r in table.itertuples():
        workload = f"{r.dataset} {r.model}{_unless_snip(r.pruning)} {r.optimizer} goal {r.goal_error:g}"
        span = f"{r.lipschitz_min:.3g}-{r.lipschitz_max:.3g}"
        steps = "-" if not math.isfinite(r.steps_at_smallest) else f"{r.steps_at_smallest:.0f}"
        lines.append(f"{workload:<40} {r.sparsity:>8g} {r.lipschitz_at_result:>10.4g} {span:>13} {steps:>7} "
                     f"{r.smallest_batch:>5}")
    return "\n".join(lines)


def optimizer_table(curves: pd.DataFrame) -> pd.DataFrame:
    """Critical batch size per sparsity (rows) and optimizer (columns), per dataset/model/schedule/goal."""
    if curves.empty:
        return pd.DataFrame()
    keys = ["dataset", "model", "pruning", "schedule", "goal_error", "sparsity"]
    return curves.pivot_table(index=keys, columns="optimizer", values="critical_batch_size", aggfunc="first")


def with_regimes(studies: pd.DataFrame, curves: pd.DataFrame) -> pd.DataFrame:
    """The studies table with its curve's regime boundaries on every row: what the plots draw."""
    bounds = curves[CURVE + ["critical_batch_size", "diminishing_batch_size"]] if not curves.empty else \
        pd.DataFrame(columns=CURVE + ["critical_batch_size", "diminishing_batch_size"])
    return studies.merge(bounds, on=CURVE, how="left")


def best_trial_paths(studies: pd.DataFrame, trials: pd.DataFrame) -> dict[tuple, str]:
    """(study key) -> the log path of its best trial, for the studies that have one."""
    index = {(*key, int(t)): p for key, t, p in zip(trials[STUDY].itertuples(index=False, name=None),
                                                     trials.trial_id, trials.path)}
    return {key: index[(*key, int(best))] for key, best in zip(studies[STUDY].itertuples(index=False, name=None),
                                                               studies.best_trial)
            if best >= 0 and (*key, int(best)) in index}


def best_trial_series(studies: pd.DataFrame, trials: pd.DataFrame, root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Over training, for each study's best trial (read from its log): the noise scale B_simple at each
    evaluation where it was measured, and every Lipschitz measurement; one row per (study, step) in
    each table, empty when no trial measured it."""
    noise, lipschitz = [], []
    for key, path in best_trial_paths(studies, trials).items():
        try:
            log = read_log(root / path, with_mask=False)
        except LogError:
            continue
        m, study = log.measurements, dict(zip(STUDY, key))
        if "noise_scale" in m:
            ok = np.isfinite(m["noise_scale"]) & (m["noise_scale"] > 0)
            noise.append(pd.DataFrame({**study, "step": m["step"][ok], "value": m["noise_scale"][ok]}))
        if log.lipschitz:
            ok = np.isfinite(log.lipschitz["value"])
            lipschitz.append(pd.DataFrame({**study, "step": log.lipschitz["step"][ok], "value": log.lipschitz["value"][ok]}))
    empty = pd.DataFrame(columns=STUDY + ["step", "value"])
    return (pd.concat(noise, ignore_index=True) if noise else empty,
            pd.concat(lipschitz, ignore_index=True) if lipschitz else empty)


def curve_of(curves: pd.DataFrame, **key: Any) -> pd.Series | None:
    """The row of ``curves`` with these column values (a whole CURVE key), None if there is none."""
    match = curves
    for column, value in key.items():
        match = match[match[column] == value]
    return match.iloc[0] if len(match) else None


# -- output ----------------------------------------------------------------------------------------


def format_studies(studies: pd.DataFrame, curves: pd.DataFrame) -> str:
    """The terminal table: steps-to-result per curve (rows) and batch size (columns)."""
    lines = []
    capped = int(studies.capped.sum()) if "capped" in studies else 0
    for workload, group in studies.groupby(WORKLOAD, sort=True):
        batch_sizes = sorted(group.batch_size.unique())
        dataset, model, pruning, optimizer, schedule, goal = workload
        lines.append(f"{dataset} {model}{_unless_snip(pruning)} {optimizer} ({schedule}), goal error {goal:g}: "
                     "steps-to-result, complete/trials in brackets")
        lines.append(f"{'sparsity':>8} " + " ".join(f"{'B=' + str(b):>11}" for b in batch_sizes)
                     + f" {'critical':>9} {'diminish':>9}")
        for sparsity, rows in group.groupby("sparsity", sort=True):
            cells = []
            for b in batch_sizes:
                row = rows[rows.batch_size == b]
                if row.empty:
                    cells.append(f"{'':>11}")
                    continue
                r = row.iloc[0]
                steps = "-" if not math.isfinite(r.steps_to_result) else f"{r.steps_to_result:.0f}"
                cells.append(f"{steps + f' ({r.complete}/{r.trials})':>11}")
            c = curve_of(curves, **dict(zip(WORKLOAD, workload)), sparsity=sparsity)
            crit, dim = (c.critical_batch_size, c.diminishing_batch_size) if c is not None else (math.nan, math.nan)
            fmt = lambda v: "-" if not math.isfinite(v) else f"{v:.0f}"  # noqa: E731
            lines.append(f"{sparsity:>8g} " + " ".join(cells) + f" {fmt(crit):>9} {fmt(dim):>9}")
    if capped:
        lines.append(f"{capped} of {int(studies.trials.sum())} trials CAPPED (stopped where they could no longer beat "
                     "their study's best; counted among the trials, not as complete)")
    return "\n".join(lines)


def write_outputs(out: Path, trials: pd.DataFrame, studies: pd.DataFrame, curves: pd.DataFrame) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, table in (("trials", trials), ("studies", studies), ("curves", curves)):
        path = out / f"{name}.csv"
        table.to_csv(path, index=False, float_format="%.6g")
        written.append(path)
    optimizers = optimizer_table(curves)
    if not optimizers.empty:
        path = out / "critical_by_optimizer.csv"
        optimizers.to_csv(path, float_format="%.6g")
        written.append(path)
    for name, table in (("noise_scale", noise_table(studies, curves)), ("lipschitz", lipschitz_table(studies))):
        if not table.empty:
            path = out / f"{name}.csv"
            table.to_csv(path, index=False, float_format="%.6g")
            written.append(path)
    return written


def aggregate(root: str | Path | Sequence[str | Path], out: str | Path, max_trials: int | None = None, rules: Rules = Rules(),
              plots: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, list[str]]:
    """Read, aggregate, write the CSVs (and plots); returns (trials, studies, curves, problems)."""
    trials, problems = read_trials(root)
    studies = study_table(trials, max_trials)
    curves = curve_table(studies, rules)
    write_outputs(Path(out), trials, studies, curves)
    if plots and not studies.empty:
        from hvd_sparse.plots import plot_all  # matplotlib only where figures are drawn (not on a study's ranks)

        base = base_folder([root] if isinstance(root, (str, Path)) else root)
        plot_all(with_regimes(studies, curves), *best_trial_series(studies, trials, base), Path(out))
    return trials, studies, curves, problems


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("runs_dir", nargs="+", help="folder(s) searched recursively for trial logs (*.h5): a "
                        "study directory, several, or a folder of them")
    parser.add_argument("--out", default=None, help="folder for the CSVs and plots (default: RUNS_DIR/aggregate, "
                        "the first RUNS_DIR)")
    parser.add_argument("--max-trials", type=int, default=None,
                        help="count only the first N trials (by trial id) of each study, for equal budgets")
    parser.add_argument("--tolerance", type=float, default=Rules.tolerance,
                        help="critical batch size: the last one within (1 + tolerance) x perfect scaling (default: %(default)s)")
    parser.add_argument("--min-saving", type=float, default=Rules.min_saving,
                        help="diminishing returns: doubling saves less than this fraction of steps (default: %(default)s)")
    parser.add_argument("--no-plots", action="store_true", help="write the CSVs only")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.max_trials is not None and args.max_trials < 1:
        parser.error("--max-trials must be >= 1")
    if args.tolerance < 0 or not 0 < args.min_saving < 1:
        parser.error("need --tolerance >= 0 and 0 < --min-saving < 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        out = Path(args.out) if args.out else Path(args.runs_dir[0]) / "aggregate"
        trials, studies, curves, problems = aggregate(
            args.runs_dir, out, args.max_trials, Rules(args.tolerance, args.min_saving), plots=not args.no_plots)
    except ValueError as e:  # AggregateError, ConfigError
        error_line(e, PROG)
        return 2
    elsewhere = int(studies.capped_elsewhere.sum()) if len(studies) else 0
    if elsewhere:
        problems.append(f"--max-trials {args.max_trials}: {elsewhere} counted trial(s) were CAPPED by a trial not "
                        "counted, so the steps-to-result of their studies are upper bounds (column capped_elsewhere); "
                        "rerun the study with capping: false for exact subsets")
    for line in problems:
        say(f"{PROG}: {line}", sys.stderr)
    report = format_studies(studies, curves) if not studies.empty else "no ended trials to aggregate"
    for extra in (format_noise(noise_table(studies, curves)), format_lipschitz(lipschitz_table(studies))) \
            if not studies.empty else ():
        report += f"\n\n{extra}" if extra else ""
    say(f"{len(trials)} trial logs, {len(studies)} studies, {len(curves)} curves -> {out}\n{report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
