"""Check that a rerun of studies reproduces the tables of an earlier run (the committed results).

    python -m hvd_sparse.aggregate runs/mnist/mnist-sgd-28ef7012d763 ... --out runs/check --no-plots
    python -m hvd_sparse.verify docs/mnist-study runs/check

Both folders are what ``hvd_sparse.aggregate`` wrote. Only the studies the rerun has are compared (a
rerun of one spec checks that spec's rows), and each of their reference trials must be there:

- a trial that ran uncapped in both runs must agree in every column but ``wall_time`` and
  ``world_sizes`` (how the work was split over jobs);
- a trial CAPPED in either run (where a trial of a packed study or a shard sees its cell's bound
  depends on which trial ended first, so which losing trials stop early, and where, may differ) must
  have the same identity columns, and what both runs recorded must fit one sequence of evaluations
  cut at two places: the shorter run was the CAPPED one, the longer one has the lower or equal best
  validation error, and where it reached the goal it did so after the step where the other was
  capped; stopped at the same step, both recorded the same;
- every study's answer (steps-to-result, best trial, its metaparameters and measurements, the fitted
  steps) must be equal; only the counts of how its trials ended (complete, incomplete, infeasible,
  capped) and the lowest error of all its trials may differ, and only where a CAPPED trial ran
  otherwise;
- the curves, the regimes, the noise-scale and Lipschitz tables must be equal.

Floats are compared as the aggregator writes them (six significant digits): the same kernels give the
same bits. Exit 0 when the rerun reproduces the reference, 1 with the differences listed (the first
ten), 2 on an input error. Where the reference records the CPU kernels it ran on (``cpu_capability.txt``)
and they are not this machine's, that is said: float sums then run in another order.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd

from hvd_sparse.aggregate import CURVE, STUDY
from hvd_sparse.cli import ArgumentParser, error_line, say

PROG = "hvd_sparse.verify"
OPERATIONAL = {"wall_time", "world_sizes"}  # how the work was split into jobs and how long it took
OUTCOME = {"status", "steps_to_result", "capping_bound", "capped_by", "best_val_error", "evaluations", "steps_done",
           "noise_at_result", "lipschitz_at_result", "lipschitz_last"}  # of a trial capped in either run
COUNTS = {"complete", "incomplete", "infeasible", "capped"}  # how a study's trials ended
LOOSE = COUNTS | {"best_val_error"}  # with a capped trial that ran otherwise (the lowest error of all its trials)
KEYS = {"curves": CURVE, "noise_scale": CURVE, "lipschitz": CURVE,
        "critical_by_optimizer": [c for c in CURVE if c != "optimizer"]}
SHOWN = 10


class VerifyError(ValueError):
    pass


@dataclass
class Report:
    trials: int = 0
    trials_capped: int = 0  # compared as prefixes: CAPPED in either run
    studies: int = 0
    studies_counts: int = 0  # same answer, trials ended otherwise (capping)
    moved: set = field(default_factory=set)  # the studies (STUDY values) with a CAPPED trial that ran otherwise
    tables: list[str] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)

    def differ(self, line: str) -> None:
        self.differences.append(line)


def read_table(folder: Path, name: str, required: bool) -> pd.DataFrame | None:
    path = folder / f"{name}.csv"
    if not path.is_file():
        if required:
            raise VerifyError(f"{folder}: no {name}.csv (a folder hvd_sparse.aggregate wrote)")
        return None
    table = pd.read_csv(path, dtype=str, keep_default_na=False)  # as written: six significant digits
    if "pruning" not in table:  # written before the aggregator named the pruning method: SNIP
        table.insert(2, "pruning", "snip")
    return table


def number(text: str) -> float:
    return float(text) if text not in ("", "nan") else float("nan")


def by_trial(trials: pd.DataFrame) -> pd.DataFrame:
    """Indexed by study hash and the path inside the study directory (the aggregator writes paths from
    the folder it was given, with or without the study directory in front)."""
    inside = [path.split("/", 1)[1] if path.split("/", 1)[0] == f"{study}-{digest}" else path
              for path, study, digest in zip(trials.path, trials.study, trials.study_hash)]
    return trials.assign(path=[f"{digest}:{p}" if digest else p for digest, p in zip(trials.study_hash, inside)])


def rerun_studies(reference: pd.DataFrame, rerun: pd.DataFrame) -> pd.DataFrame:
    """The reference's trials of the studies the rerun has."""
    key = ["study", "study_hash"]
    ran = set(map(tuple, rerun[key].values))
    return reference[reference[key].apply(tuple, axis=1).isin(ran)]


def compare_capped(path: str, a: pd.Series, b: pd.Series, report: Report) -> None:
    """One trial, CAPPED in one run or both: what the tables hold must fit one sequence of evaluations,
    cut at two places."""
    short, long = (a, b) if int(a.steps_done) <= int(b.steps_done) else (b, a)
    errors = number(short.best_val_error), number(long.best_val_error)
    if short.steps_done == long.steps_done:
        same = OUTCOME - {"capping_bound", "capped_by"}
        if {a.status, b.status} == {"CAPPED", "INCOMPLETE"}:  # its last evaluation met the bound, or not yet
            same -= {"status"}
        changed = [c for c in sorted(same) if short[c] != long[c]]
        if changed:
            report.differ(f"trial {path}: stopped at step {short.steps_done} in both runs, {changed[0]} "
                          f"{a[changed[0]]!r} in the reference, {b[changed[0]]!r} here")
    elif short.status != "CAPPED":
        report.differ(f"trial {path}: ended {short.status} at step {short.steps_done} in one run, went on to step "
                      f"{long.steps_done} in the other")
    elif math.isnan(errors[0]) != math.isnan(errors[1]) or errors[1] > errors[0]:
        report.differ(f"trial {path}: best validation error {long.best_val_error or '-'} after {long.steps_done} "
                      f"steps, {short.best_val_error or '-'} after {short.steps_done}: not the same evaluations")
    elif long.status == "COMPLETE" and int(long.steps_to_result) <= int(short.steps_done):
        report.differ(f"trial {path}: reached the goal at step {long.steps_to_result} in one run and missed it "
                      f"up to step {short.steps_done} (CAPPED) in the other")


def compare_trials(reference: pd.DataFrame, rerun: pd.DataFrame, report: Report) -> None:
    ref = by_trial(rerun_studies(reference, rerun)).set_index("path")
    new = by_trial(rerun).set_index("path")
    columns = [c for c in ref.columns if c in new.columns and c not in OPERATIONAL]
    for path, a in ref.iterrows():
        if path not in new.index:
            report.differ(f"trial {path}: in the reference, not in the rerun")
            continue
        b = new.loc[path]
        report.trials += 1
        if b.status == "RUNNING":
            report.differ(f"trial {path}: still RUNNING in the rerun (resume it)")
        elif "CAPPED" in (a.status, b.status):
            report.trials_capped += 1
            if any(a[c] != b[c] for c in OUTCOME):
                report.moved.add(tuple(a[c] for c in STUDY))
            same = [c for c in columns if c not in OUTCOME]
            changed = [c for c in same if a[c] != b[c]]
            if changed:
                report.differ(f"trial {path}: {changed[0]} {a[changed[0]]!r} in the reference, {b[changed[0]]!r} here")
            else:
                compare_capped(path, a, b, report)
        else:
            changed = [c for c in columns if a[c] != b[c]]
            if changed:
                report.differ(f"trial {path}: {changed[0]} {a[changed[0]]!r} in the reference, {b[changed[0]]!r} "
                              "here" + (f" (and {len(changed) - 1} more columns)" if len(changed) > 1 else ""))
    for path in new.index.difference(ref.index):
        report.differ(f"trial {path}: in the rerun, not in the reference")


def compare_keyed(name: str, reference: pd.DataFrame, rerun: pd.DataFrame, key: list[str], report: Report,
                  loose: set[str] = frozenset(), loose_rows: set[tuple] = frozenset()) -> int:
    """Rows matched on ``key``: the reference's rows the rerun has must be equal but for the ``loose``
    columns of the ``loose_rows``; returns how many rows differ only there. Rows of the rerun the
    reference lacks differ."""
    ref, new = reference.set_index(key), rerun.set_index(key)
    columns = [c for c in ref.columns if c in new.columns]
    loose_only = 0
    for index, b in new.iterrows():
        where = " ".join(f"{k}={v}" for k, v in zip(key, index if isinstance(index, tuple) else (index,)))
        if index not in ref.index:
            report.differ(f"{name}: {where}: not in the reference")
            continue
        a = ref.loc[index]
        changed = [c for c in columns if a[c] != b[c]]
        strict = [c for c in changed if c not in loose or index not in loose_rows]
        if strict:
            report.differ(f"{name}: {where}: {strict[0]} {a[strict[0]]!r} in the reference, {b[strict[0]]!r} here")
        elif changed:
            loose_only += 1
    return loose_only


def verify(reference: str | Path, rerun: str | Path) -> Report:
    reference, rerun = Path(reference), Path(rerun)
    report = Report()
    ref_trials, new_trials = read_table(reference, "trials", True), read_table(rerun, "trials", True)
    compare_trials(ref_trials, new_trials, report)
    ref_studies, new_studies = read_table(reference, "studies", True), read_table(rerun, "studies", True)
    report.studies = len(new_studies)
    report.studies_counts = compare_keyed("studies", ref_studies, new_studies, STUDY, report, LOOSE, report.moved)
    for name, key in KEYS.items():
        ref, new = read_table(reference, name, False), read_table(rerun, name, False)
        if new is None and ref is None:
            continue
        if new is None or ref is None:
            report.differ(f"{name}.csv: in {'the reference' if new is None else 'the rerun'} only")
            continue
        compare_keyed(name, ref, new, key, report)
        report.tables.append(name)
    return report


def kernels_note(reference: Path) -> str | None:
    recorded = reference / "cpu_capability.txt"
    if not recorded.is_file():
        return None
    import torch

    here, there = torch.backends.cpu.get_cpu_capability(), recorded.read_text().strip()
    if here == there:
        return None
    return (f"the reference ran on {there} kernels, this machine has {here}: convolutions sum in another order, "
            "so measurements may differ in their last bits and trials may part")


def format_report(report: Report) -> str:
    lines = [f"{report.trials} trials compared ({report.trials - report.trials_capped} exactly, "
             f"{report.trials_capped} CAPPED in either run, consistent with the same evaluations), "
             f"{report.studies} studies ({report.studies_counts} of them with the same answer and another count "
             f"of how their trials ended), tables: {', '.join(['trials', 'studies', *report.tables])}"]
    if report.differences:
        lines.append(f"{len(report.differences)} difference(s):")
        lines += [f"  {line}" for line in report.differences[:SHOWN]]
        if len(report.differences) > SHOWN:
            lines.append(f"  ... and {len(report.differences) - SHOWN} more")
    else:
        lines.append("reproduced: every compared trial, study answer, curve and table as in the reference")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("reference", help="the folder of the earlier run's tables (e.g. docs/mnist-study)")
    parser.add_argument("rerun", help="the folder hvd_sparse.aggregate wrote from the rerun's logs")
    return parser.parse_args(list(sys.argv[1:] if argv is None else argv))


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        report = verify(args.reference, args.rerun)
    except (ValueError, KeyError, AttributeError, OSError) as e:  # VerifyError, a CSV without a column, unreadable
        error_line(e, PROG)
        return 2
    note = kernels_note(Path(args.reference))
    if note:
        say(f"{PROG}: {note}", sys.stderr)
    say(format_report(report))
    return 1 if report.differences else 0


if __name__ == "__main__":
    sys.exit(main())
