"""Compare the scaling curves of several workloads from their aggregated tables.

    python -m hvd_sparse.compare docs/fashion-study docs/mnist-study [--out comparison.csv]

Each folder is what ``hvd_sparse.aggregate`` wrote (``studies.csv``, ``curves.csv`` and, where the
noise scale was measured, ``noise_scale.csv``), so the comparison needs no trial logs. One row per workload, optimizer and
sparsity (and pruning method): the measured critical batch size and maximal useful batch size (the aggregator's, read off
its fitted curve), the steps at the smallest batch size, the sparse network's steps over the dense
network's at the same batch size (median and range over the batch sizes both reached), and the
gradient noise scale B_simple at the goal against the critical batch size. Printed as one table with
the workloads side by side.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd

from hvd_sparse.cli import ArgumentParser, error_line, say

PROG = "hvd_sparse.compare"
KEY = ["dataset", "model", "optimizer", "pruning", "schedule", "goal_error"]
TABLES = ("studies.csv", "curves.csv")  # and noise_scale.csv where the noise scale was measured


class CompareError(ValueError):
    pass


def read_folder(folder: str | Path) -> dict[str, pd.DataFrame]:
    folder = Path(folder)
    missing = [name for name in TABLES if not (folder / name).is_file()]
    if missing:
        raise CompareError(f"{folder}: no {' or '.join(missing)} (a folder hvd_sparse.aggregate wrote)")
    tables = {name.removesuffix(".csv"): pd.read_csv(folder / name) for name in TABLES}
    noise = folder / "noise_scale.csv"
    tables["noise_scale"] = pd.read_csv(noise) if noise.is_file() else pd.DataFrame(
        columns=KEY + ["sparsity", "noise_scale_at_goal", "predicted_over_measured"])
    for table in tables.values():  # tables written before the aggregator named the pruning method: SNIP
        table["pruning"] = table["pruning"].fillna("snip") if "pruning" in table else "snip"
    return tables


def step_ratios(studies: pd.DataFrame) -> pd.DataFrame:
    """Each sparse study's steps-to-result over the dense study's at the same batch size (same workload
    and optimizer), where both reached the goal: median, lowest and highest over the batch sizes."""
    reached = studies.dropna(subset=["steps_to_result"])
    dense = reached[reached.sparsity == 0].set_index(KEY + ["batch_size"]).steps_to_result
    if not dense.index.is_unique:
        raise CompareError("two dense studies of one workload and batch size")
    rows = []
    for key, group in reached[reached.sparsity > 0].groupby(KEY + ["sparsity"]):
        ratios = [row.steps_to_result / dense[(*key[:-1], row.batch_size)] for row in group.itertuples()
                  if (*key[:-1], row.batch_size) in dense.index]
        if ratios:
            series = pd.Series(ratios)
            rows.append({**dict(zip(KEY + ["sparsity"], key)), "ratio_median": series.median(),
                         "ratio_min": series.min(), "ratio_max": series.max(), "ratio_batches": len(ratios)})
    return pd.DataFrame(rows, columns=KEY + ["sparsity", "ratio_median", "ratio_min", "ratio_max", "ratio_batches"])


def comparison(folders: Sequence[str | Path]) -> pd.DataFrame:
    """One row per (workload, optimizer, sparsity) of every folder. A sparse curve's steps are divided
    by the dense curve's of its workload and optimizer wherever that is: in its own folder, or in
    another (the middle sparsities studied apart from the grid)."""
    parts, studies = [], []
    for folder in folders:
        tables = read_folder(folder)
        curves = tables["curves"][KEY + ["sparsity", "smallest_batch", "steps_at_smallest",
                                         "critical_batch_size", "diminishing_batch_size"]]
        noise = tables["noise_scale"][KEY + ["sparsity", "noise_scale_at_goal", "predicted_over_measured"]]
        parts.append(curves.merge(noise, on=KEY + ["sparsity"], how="left"))
        studies.append(tables["studies"])
    table = pd.concat(parts, ignore_index=True)
    if table.duplicated(KEY + ["sparsity"]).any():
        raise CompareError("the same workload, optimizer, pruning method and sparsity appear in two folders")
    table = table.merge(step_ratios(pd.concat(studies, ignore_index=True)), on=KEY + ["sparsity"], how="left")
    return table.sort_values(["optimizer", "pruning", "sparsity", "dataset"], ignore_index=True)


def _batch(value: float) -> str:
    return "-" if pd.isna(value) else f"{int(value)}"


def _ratio(row) -> str:
    if row.sparsity == 0:
        return "1"
    if pd.isna(row.ratio_median):
        return "-"
    return f"{row.ratio_median:.2f} ({row.ratio_min:.1f}-{row.ratio_max:.1f})"


def format_comparison(table: pd.DataFrame) -> str:
    header = (f"{'optimizer':<10}{'sparsity':>9}  {'workload':<36}{'critical':>9}{'maximal':>9}{'steps at smallest':>19}"
              f"  {'sparse/dense steps: median (range)':<36}{'B_simple':>9}{'/critical':>10}")
    lines = [header]
    for row in table.itertuples():
        workload = f"{row.dataset}{f' {row.pruning}' if row.pruning != 'snip' else ''} goal {row.goal_error:g}"
        smallest = "-" if pd.isna(row.steps_at_smallest) else f"{int(row.steps_at_smallest)} at B={int(row.smallest_batch)}"
        noise = "-" if pd.isna(row.noise_scale_at_goal) else f"{row.noise_scale_at_goal:.0f}"
        over = "-" if pd.isna(row.predicted_over_measured) else f"{row.predicted_over_measured:.1f}"
        lines.append(f"{row.optimizer:<10}{row.sparsity:>9g}  {workload:<36}{_batch(row.critical_batch_size):>9}"
                     f"{_batch(row.diminishing_batch_size):>9}{smallest:>19}  {_ratio(row):<36}{noise:>9}{over:>10}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="folders hvd_sparse.aggregate wrote (studies.csv, curves.csv, "
                                                   "noise_scale.csv)")
    parser.add_argument("--out", help="also write the table as CSV here")
    return parser.parse_args(list(sys.argv[1:] if argv is None else argv))


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        table = comparison(args.folders)
        text = format_comparison(table)
        if args.out:
            table.to_csv(args.out, index=False)
    except (ValueError, KeyError, OSError) as e:  # CompareError, ConfigError, a CSV without a column, unreadable
        error_line(e, PROG)
        return 2
    say(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
