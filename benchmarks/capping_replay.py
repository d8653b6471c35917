"""What capping and best-first order would have saved a finished study: its trials replayed.

    python benchmarks/capping_replay.py docs/fashion-study/trials.csv [docs/fashion-study/stability-8/trials.csv ...]
    python benchmarks/capping_replay.py runs/fashion/fashion-mnist-nesterov-8196da22701d   # a folder of logs
    python benchmarks/capping_replay.py docs/fashion-study/trials.csv --query "optimizer == 'nesterov' and sparsity == 0.9"

Each study cell (optimizer, sparsity, batch size) is replayed as one runner would run it, one trial
after another, batch sizes in ascending order: a trial stops at its first evaluation at or past the
fewest steps-to-result found so far in its cell, unless it reached the goal there (``hvd_sparse.capping``).
Three orders of the trials within a cell: trial order; best first (the best trial of the previous batch
size first, as the study runs them); and the perfect order (the cell's own best first: a lower bound).

The cost of a trial stopped at step ``e``: from a log, exactly its logged wall time at the evaluation
at ``e``; from a trials table (one row per trial, as the aggregator writes it), its wall time times
``e / steps_done`` (steps cost the same within a trial). Trials that ran side by side (``--pack``) see
a bound only once it exists; the replay, one trial after another, is what one runner would save.
Every cell's steps-to-result and best trial are checked to be the same with and without capping.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from hvd_sparse.aggregate import read_trials


@dataclass(frozen=True)
class Trial:
    trial_id: int
    status: str
    steps_to_result: float  # NaN unless COMPLETE
    steps_done: int
    cost: Callable[[int], float]  # seconds spent up to (and including the evaluation at) a step
    eval_steps: tuple[int, ...]  # the steps it was (or would be) evaluated at, ascending

    def stop(self, bound: float) -> int:
        """The step it ends at when capped by ``bound`` (its own end if the bound never bites)."""
        for e in self.eval_steps:
            if e > self.steps_done:
                break
            reached = self.status == "COMPLETE" and e >= self.steps_to_result
            if reached:
                return self.steps_done
            if e >= bound:
                return e
        return self.steps_done


def table_trials(rows: pd.DataFrame) -> list[Trial]:
    out = []
    for r in rows.itertuples():
        steps = list(range(0, int(r.max_steps) + 1, int(r.eval_every)))
        steps += [int(r.max_steps)] if steps[-1] != r.max_steps else []
        done, wall = int(r.steps_done), float(r.wall_time)
        out.append(Trial(int(r.trial_id), r.status, float(r.steps_to_result), done,
                         lambda e, wall=wall, done=done: wall * min(e, done) / max(done, 1), tuple(steps)))
    return out


def log_trials(rows: pd.DataFrame, root: Path) -> list[Trial]:
    from hvd_sparse.log import read_log

    out = []
    for r in rows.itertuples():
        m = read_log(root / r.path, with_mask=False).measurements
        steps, wall = [int(s) for s in m["step"]], [float(w) for w in m["wall_time"]]
        by_step = dict(zip(steps, wall))
        out.append(Trial(int(r.trial_id), r.status, float(r.steps_to_result), int(r.steps_done),
                         lambda e, by_step=by_step: by_step[e], tuple(steps)))
    return out


def replay_cell(trials: Sequence[Trial], first: int | None) -> tuple[float, float]:
    """(seconds, steps-to-result) of one cell run in trial order, with trial ``first`` moved first."""
    order = sorted(trials, key=lambda t: (t.trial_id != first, t.trial_id))
    bound, seconds = math.inf, 0.0
    for t in order:
        stop = t.stop(bound)
        seconds += t.cost(stop)
        if t.status == "COMPLETE" and stop == t.steps_done:
            bound = min(bound, t.steps_to_result)
    return seconds, bound


def best_of(trials: Sequence[Trial]) -> int | None:
    done = [(t.steps_to_result, t.trial_id) for t in trials if t.status == "COMPLETE"]
    return min(done)[1] if done else None


def replay(table: pd.DataFrame, trials_of: Callable[[pd.DataFrame], list[Trial]]) -> dict[str, float]:
    """Core-hours of the table's cells uncapped and under the three orders."""
    hours = dict.fromkeys(("uncapped", "trial order", "best first", "perfect order"), 0.0)
    keys = ["study", "optimizer", "sparsity"]
    for _, curve in table[table.status != "RUNNING"].groupby(keys, sort=True):
        previous_best = None
        for _, cell in curve.groupby("batch_size", sort=True):
            trials = trials_of(cell)
            truth = min((t.steps_to_result for t in trials if t.status == "COMPLETE"), default=math.inf)
            hours["uncapped"] += sum(t.cost(t.steps_done) for t in trials) / 3600
            for name, first in (("trial order", None), ("best first", previous_best), ("perfect order", best_of(trials))):
                seconds, found = replay_cell(trials, first)
                assert found == truth, f"capping changed a cell's steps-to-result: {found} != {truth}"
                hours[name] += seconds / 3600
            previous_best = best_of(trials) if best_of(trials) is not None else previous_best
    return hours


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", help="trials tables (trials.csv) or folders of study logs")
    parser.add_argument("--query", help="only the trials this pandas query selects, e.g. \"sparsity == 0.9\"")
    args = parser.parse_args(argv)
    print(f"{'source':<58} {'study':<28} {'uncapped':>9} {'trial order':>12} {'best first':>11} {'perfect':>9}")
    for source in map(Path, args.sources):
        if source.is_dir():
            table, _ = read_trials(source)
            trials_of = lambda rows: log_trials(rows, source)  # noqa: E731
        else:
            table, trials_of = pd.read_csv(source), table_trials
        if args.query:
            table = table.query(args.query)
        for study, part in table.groupby("study", sort=True):
            h = replay(part, trials_of)
            ratio = lambda k: f"{h[k]:.2f} {h['uncapped'] / h[k]:.2f}x"  # noqa: E731
            print(f"{str(source):<58} {study:<28} {h['uncapped']:>8.2f}h {ratio('trial order'):>12} "
                  f"{ratio('best first'):>11} {ratio('perfect order'):>9}")
        if table.study.nunique() > 1:
            h = replay(table, trials_of)
            print(f"{str(source):<58} {'(all)':<28} {h['uncapped']:>8.2f}h "
                  + " ".join(f"{h[k]:.2f} {h['uncapped'] / h[k]:.2f}x" for k in ("trial order", "best first", "perfect order")))
    print("core-hours; the ratio is uncapped / capped. Every cell's steps-to-result checked unchanged.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
