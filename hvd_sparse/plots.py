"""Figures of the aggregated studies (matplotlib, PNG and PDF): they draw the tables that
``hvd_sparse.aggregate`` computed, and compute and read nothing themselves.

The input is the studies table with each curve's regime boundaries on every row
(``aggregate.with_regimes``) and, for the figures over training, ``aggregate.best_trial_series``.
One figure set per (dataset, model, schedule, goal error), one panel per optimizer, one line per
sparsity:
- ``steps_*``: steps-to-result vs batch size, log2-log2: the measured points, the curve the regime
  rules read (``aggregate.scaling_fit``) and its dashed perfect-scaling line from the smallest batch
  size; o marks the critical batch size, x the diminishing-returns one;
- ``normalized_*``: the same curves divided by their value at the smallest batch size;
- ``metaparams_*``: the best trial's learning rate (and momentum) vs batch size;
- ``noise_*`` (when the trials measured it): the gradient noise scale over training, beside the
  critical batch size the studies measured;
- ``lipschitz_*`` (when the trials measured it): the gradient's Lipschitz constant over training,
  and ``lipschitz_by_sparsity_*``: every measurement, and their median, against sparsity.
"""
from __future__ import annotations

import itertools
import math
import textwrap
from pathlib import Path
from typing import Any, Iterator

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib import ticker  # noqa: E402

FIGURE_KEYS = ["dataset", "model", "pruning", "schedule", "goal_error"]
Figures = Iterator[tuple[str, plt.Figure]]  # (file name without its suffix, figure)


def _name(key: tuple) -> str:
    dataset, model, pruning, schedule, goal = key
    method = "" if pruning == "snip" else "_" + "".join(c if c.isalnum() else "-" for c in pruning)
    return f"{dataset}_{model}{method}_{schedule}_goal{goal:g}"


def _title(key: tuple) -> str:
    dataset, model, pruning, schedule, goal = key
    return f"{dataset} {model}{'' if pruning == 'snip' else ', pruned by ' + pruning} ({schedule}), goal error {goal:g}"


def _log2_axes(ax: plt.Axes, batch_sizes: np.ndarray) -> None:
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xticks(batch_sizes)
    ax.set_xticklabels([str(int(b)) for b in batch_sizes], rotation=45)
    ax.grid(True, which="major", alpha=0.3)
    ax.set_xlabel("batch size")


def _suptitle(fig: plt.Figure, text: str) -> None:
    """The figure's title, its lines wrapped at spaces until it fits the figure's width as drawn (a
    one-panel figure is narrower than most titles)."""
    title = fig.suptitle(text)
    renderer = fig.canvas.get_renderer()
    for width in range(max(map(len, text.splitlines())), 8, -2):
        lines = (textwrap.fill(line, width, break_long_words=False, break_on_hyphens=False) for line in text.splitlines())
        title.set_text("\n".join(lines))
        if title.get_window_extent(renderer).width <= 0.96 * fig.bbox.width:
            return


def _octave_ticks(ax: plt.Axes) -> None:
    """A log2 y axis labelled in plain numbers, between the powers of 2 too where its data span few octaves
    (where powers of 2 alone would label one tick, or none)."""
    ax.set_yscale("log", base=2)
    low, high = ax.get_ylim()
    octaves = math.log2(high / low)
    subs = (1.0, 1.25, 1.5, 1.75) if octaves < 2 else (1.0, 1.5) if octaves < 4 else (1.0,)
    ax.yaxis.set_major_locator(ticker.LogLocator(base=2, subs=subs))
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))


def _save(fig: plt.Figure, out: Path, stem: str) -> list[Path]:
    paths = [out / f"{stem}.png", out / f"{stem}.pdf"]
    for path in paths:
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return paths


def _mark(ax: plt.Axes, x: np.ndarray, y: np.ndarray, at: float, marker: str, color: str) -> None:
    if math.isfinite(at) and at in set(x.tolist()):
        ax.plot([at], [y[list(x).index(at)]], marker=marker, markersize=11, markerfacecolor="none",
                markeredgewidth=1.6, color=color, linestyle="none")


def _figures(table: pd.DataFrame, width: float, height: float) -> Iterator[tuple[tuple, Any, list[tuple[Any, str, pd.DataFrame]]]]:
    """One figure per FIGURE_KEYS group of ``table``, one panel (width x height inches) per optimizer:
    yields (key, figure, [(axes, optimizer, that optimizer's rows)])."""
    for key, group in table.groupby(FIGURE_KEYS, sort=True):
        if not _anything(group):
            continue
        optimizers = sorted(group.optimizer.unique())
        fig, axes = plt.subplots(1, len(optimizers), figsize=(width * len(optimizers), height), squeeze=False)
        yield key, fig, [(ax, o, group[group.optimizer == o]) for ax, o in zip(axes[0], optimizers)]


def _anything(rows: pd.DataFrame) -> bool:
    """Whether a figure of these rows has a point to draw: a workload none of whose trials reached the
    goal (a pruning method that never trains to it) gets no figure, only its rows in the tables."""
    return "steps_to_result" not in rows or bool((np.isfinite(rows.steps_to_result) & (rows.steps_to_result > 0)).any())


def _bounds(rows: pd.DataFrame) -> tuple[float, float]:
    """(critical, diminishing-returns batch size) of the curve these rows of one curve belong to."""
    if rows.empty or "critical_batch_size" not in rows:
        return math.nan, math.nan
    return float(rows.critical_batch_size.iloc[0]), float(rows.diminishing_batch_size.iloc[0])


def steps_figures(points: pd.DataFrame, normalized: bool) -> Figures:
    for key, fig, panels in _figures(points, 4.6, 4.2):
        all_b = np.array(sorted({b for _, _, group in panels for b in group.batch_size}), dtype=float)
        for ax, optimizer, group in panels:
            for i, (sparsity, rows) in enumerate(group.groupby("sparsity", sort=True)):
                # log axes: a goal reached at the first evaluation (0 steps) has no place on them
                rows = rows[np.isfinite(rows.steps_to_result) & (rows.steps_to_result > 0)].sort_values("batch_size")
                if rows.empty:
                    continue
                color = f"C{i}"
                x, y = rows.batch_size.to_numpy(float), rows.steps_to_result.to_numpy(float)
                if normalized:
                    y = y / y[0]
                fit = rows.fitted_steps.to_numpy(float) / (rows.steps_to_result.iloc[0] if normalized else 1.0)
                ax.plot(x, y, marker=".", linestyle="none", color=color, label=f"sparsity {sparsity:g}")
                ax.plot(x, fit, color=color, linewidth=1.4)  # the fitted curve the regime rules read
                ax.plot(x, fit[0] * x[0] / x, linestyle="--", color=color, alpha=0.6, linewidth=1)
                critical, diminishing = _bounds(rows)
                _mark(ax, x, y, critical, "o", color)
                _mark(ax, x, y, diminishing, "X", color)
            _log2_axes(ax, all_b)
            ax.set_title(optimizer)
            ax.set_ylabel("steps / steps at smallest batch" if normalized else "steps to result")
            ax.legend(fontsize=8, title="dots: measured, line: fit\ndashed: perfect scaling\no critical, x diminishing",
                      title_fontsize=7)
        fig.suptitle(_title(key))
        yield ("normalized_" if normalized else "steps_") + _name(key), fig


def metaparams_figures(points: pd.DataFrame) -> Figures:
    for key, fig_group in points.groupby(FIGURE_KEYS, sort=True):
        if not _anything(fig_group):
            continue
        optimizers = sorted(fig_group.optimizer.unique())
        has_momentum = bool(np.isfinite(fig_group.best_momentum).any())
        rows_n = 2 if has_momentum else 1
        fig, axes = plt.subplots(rows_n, len(optimizers), figsize=(4.6 * len(optimizers), 3.6 * rows_n), squeeze=False)
        all_b = np.array(sorted(fig_group.batch_size.unique()), dtype=float)
        for col, optimizer in enumerate(optimizers):
            group = fig_group[fig_group.optimizer == optimizer]
            for i, (sparsity, rows) in enumerate(group.groupby("sparsity", sort=True)):
                rows = rows[np.isfinite(rows.steps_to_result)].sort_values("batch_size")
                axes[0][col].plot(rows.batch_size, rows.best_lr, marker="o", color=f"C{i}", label=f"sparsity {sparsity:g}")
                if has_momentum:
                    axes[1][col].plot(rows.batch_size, 1 - rows.best_momentum, marker="o", color=f"C{i}")
            axes[0][col].set_title(optimizer)
            axes[0][col].set_ylabel("best learning rate")
            axes[0][col].legend(fontsize=8)
            panels = [axes[0][col]]
            if has_momentum and np.isfinite(group.best_momentum).any():
                axes[1][col].set_ylabel("1 - best momentum")
                panels.append(axes[1][col])
            elif has_momentum:
                axes[1][col].axis("off")  # plain SGD has no momentum
            for ax in panels:
                if ax.has_data():
                    _log2_axes(ax, all_b)
                    ax.set_yscale("log")
        fig.suptitle(f"best metaparameters: {_title(key)}")
        yield "metaparams_" + _name(key), fig


def series_figures(points: pd.DataFrame, series: pd.DataFrame, stem: str, ylabel: str, title: str,
                   bounds: bool) -> Figures:
    """A quantity over training (``series``: study keys, step, value) of each batch size's best trial,
    one colour per sparsity; with ``bounds``, in the same colour the batch sizes the studies measured:
    critical (dashed) and diminishing-returns (dotted)."""
    if series.empty:
        return
    for key, fig, panels in _figures(points, 6.4, 4.8):
        in_figure = series
        for column, value in zip(FIGURE_KEYS, key):
            in_figure = in_figure[in_figure[column] == value]
        for ax, optimizer, group in panels:
            for i, (sparsity, rows) in enumerate(group.groupby("sparsity", sort=True)):
                label = f"sparsity {sparsity:g}"
                lines = in_figure[(in_figure.optimizer == optimizer) & (in_figure.sparsity == sparsity)]
                for _, line in lines.groupby("batch_size", sort=True):  # a series of one value is a marker
                    ax.plot(line.step, line.value, color=f"C{i}", alpha=0.7, linewidth=1, label=label,
                            marker="o" if len(line) == 1 else None, markersize=4)
                    label = None
                for value, style in zip(_bounds(rows), ("--", ":")) if bounds else ():
                    if math.isfinite(value):
                        ax.axhline(value, color=f"C{i}", linestyle=style, linewidth=1.4)
            if bounds:
                ax.plot([], [], color="gray", linestyle="--", label="measured critical B")
                ax.plot([], [], color="gray", linestyle=":", label="measured diminishing-returns B")
            ax.set_yscale("log", base=2)
            ax.grid(True, which="major", alpha=0.3)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.set_title(optimizer)
            if ax.has_data():
                ax.legend(fontsize=8)
        fig.suptitle(f"{title}:\n{_title(key)}")
        yield f"{stem}_" + _name(key), fig


def lipschitz_by_sparsity_figures(lipschitz: pd.DataFrame) -> Figures:
    """Every Lipschitz measurement of the best trials (dots) and their median (line) against sparsity,
    one panel per optimizer: the paper's fifth finding at a glance."""
    if lipschitz.empty:
        return
    for key, fig, panels in _figures(lipschitz, 4.6, 4.2):
        for ax, optimizer, rows in panels:
            ax.plot(rows.sparsity, rows.value, marker=".", linestyle="none", color="C0", alpha=0.6, label="measurements")
            medians = rows.groupby("sparsity").value.median()
            ax.plot(medians.index, medians.to_numpy(), marker="o", color="C1", label="median")
            _octave_ticks(ax)
            ax.set_xticks(medians.index, [f"{s:g}" for s in medians.index])  # every sparsity measured
            ax.grid(True, which="major", alpha=0.3)
            ax.set_xlabel("sparsity")
            ax.set_ylabel("Lipschitz constant along the update")
            ax.set_title(optimizer)
            ax.legend(fontsize=8)
        _suptitle(fig, f"gradient Lipschitz constant: {_title(key)}")
        yield "lipschitz_by_sparsity_" + _name(key), fig


def methods_figures(points: pd.DataFrame) -> Figures:
    """Where one curve (dataset, model, optimizer, schedule, goal, sparsity) was measured with several
    pruning methods: one line per method, steps-to-result and its normalized form side by side."""
    keys = ["dataset", "model", "optimizer", "schedule", "goal_error", "sparsity"]
    for key, group in points.groupby(keys, sort=True):
        if group.pruning.nunique() < 2:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(9.2, 4.2), squeeze=False)
        all_b = np.array(sorted(group.batch_size.unique()), dtype=float)
        for i, (pruning, rows) in enumerate(group.groupby("pruning", sort=True)):
            rows = rows[np.isfinite(rows.steps_to_result) & (rows.steps_to_result > 0)].sort_values("batch_size")
            if rows.empty:
                continue
            x, y = rows.batch_size.to_numpy(float), rows.steps_to_result.to_numpy(float)
            for ax, values in zip(axes[0], (y, y / y[0])):
                ax.plot(x, values, marker="o", color=f"C{i}", label=pruning)
                critical, diminishing = _bounds(rows)
                _mark(ax, x, values, critical, "o", f"C{i}")
                _mark(ax, x, values, diminishing, "X", f"C{i}")
        axes[0][1].plot(all_b, all_b[0] / all_b, linestyle="--", color="grey", linewidth=1, alpha=0.6)
        for ax, label in zip(axes[0], ("steps to result", "steps / steps at smallest batch")):
            _log2_axes(ax, all_b)
            ax.set_ylabel(label)
            ax.legend(fontsize=8, title="o critical, x diminishing\ndashed: perfect scaling", title_fontsize=7)
        dataset, model, optimizer, schedule, goal, sparsity = key
        fig.suptitle(f"pruning methods: {dataset} {model} {optimizer} ({schedule}), sparsity {sparsity:g}, goal error {goal:g}")
        yield f"methods_{dataset}_{model}_{optimizer}_{schedule}_goal{goal:g}_s{sparsity:g}", fig


def figures(points: pd.DataFrame, noise: pd.DataFrame, lipschitz: pd.DataFrame) -> Figures:
    """Every figure, laid out, one at a time (the caller closes each): ``points`` is
    ``aggregate.with_regimes``'s table, ``noise`` and ``lipschitz`` the two tables of
    ``aggregate.best_trial_series``."""
    for stem, fig in itertools.chain(
            steps_figures(points, normalized=False), steps_figures(points, normalized=True),
            metaparams_figures(points), methods_figures(points),
            series_figures(points, noise, "noise", "noise scale B_simple (best trial per batch size)",
                           "gradient noise scale", bounds=True),
            series_figures(points, lipschitz, "lipschitz", "Lipschitz constant along the update (best trial per batch size)",
                           "gradient Lipschitz constant", bounds=False),
            lipschitz_by_sparsity_figures(lipschitz)):
        fig.tight_layout()
        yield stem, fig


def plot_all(points: pd.DataFrame, noise: pd.DataFrame, lipschitz: pd.DataFrame, out: Path) -> list[Path]:
    """Every figure of ``figures``, as PNG and PDF in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    return [path for stem, fig in figures(points, noise, lipschitz) for path in _save(fig, out, stem)]
