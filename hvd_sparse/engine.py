"""The trial engine: the trials' states, their loop of steps and evaluations, and rank 0's recorders.

``train`` (one trial) and ``study`` (many, ``--fuse`` at a time) both drive the ``Engine``: one loop
over the trials it holds, one of them, or several of one study cell fused into one model
(``hvd_sparse.fused``). What changes while a trial trains is its ``TrialState``, exactly what its
checkpoint stores; stopping on a signal and resuming are a checkpoint of that state and a load of
it. The files (log, checkpoint, final model) are each trial's ``Recorder``'s, held by rank 0; the
other ranks hold a ``NullRecorder``.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, NoReturn, Sequence, TextIO

import torch
from torch import nn
from tqdm import tqdm

import hvd_sparse
from hvd_sparse import dist, gradsync, registry
from hvd_sparse import fused as fused_ops
from hvd_sparse.batchnorm import batch_statistics, local_statistics, synced, unsynced
from hvd_sparse.capping import Bound, capped_at, tightest
from hvd_sparse.checkpoint import Checkpoint, Progress, checkpoint_path, plan_start, save_checkpoint
from hvd_sparse.config import Config, ConfigError, seed_for
from hvd_sparse.data import DataError, Datasets, Examples, GlobalBatches, check_data_dir, eval_slice, load_datasets
from hvd_sparse.log import TrialLog, read_log, write_atomically
from hvd_sparse.mask import Mask
from hvd_sparse.models import Loss, build_model, get_factory, loss_for, prunable_names, summed
from hvd_sparse.measure import Measurement, Trial, average_contributions, check_measurements, measurements_for
from hvd_sparse.noise import local_gradients
from hvd_sparse.watch import PACE, STOP_CHECK_EVERY, watch_launcher
from hvd_sparse.optim import OPTIMIZERS, build_optimizer, learning_rate, set_learning_rate
from hvd_sparse.pruning import PRUNING, ScoreInput, kept_count, prune

logger = logging.getLogger("hvd_sparse")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: list[str] = []  # the stop signals this process received (their names), or why it stops


class Interrupted(Exception):
    """A stop signal reached a rank: the trial checkpointed at an agreed step and the job should end
    (exit 0, so that a scheduler can requeue it); running the same command again resumes."""


def install_stop_handlers(prog: str) -> None:
    """SIGTERM and SIGUSR1 (SLURM's preemption and time-limit warnings) stop training cleanly, and so
    does the exit of the launcher above this rank (``watch``)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: _received.append(signal.Signals(signum).name))
    watch_launcher(_received.append, prog)


def stop_requested() -> bool:
    """Whether this process received a stop signal."""
    return bool(_received)


@dataclass(frozen=True)
class TrialResult:
    status: str  # COMPLETE, INCOMPLETE, INFEASIBLE or CAPPED
    steps_to_result: int | None
    best_val_error: float
    steps_done: int
    world_size: int
    density: float
    layer_density: dict[str, float]
    mask_sha256: str
    test_error: float | None
    log_path: Path | None


# -- the job: checks, ranks, data --------------------------------------------------------------


def validate(cfg: Config) -> None:
    """Checks that need no data and no ranks, so every rank fails fast and identically."""
    check_data_dir(cfg.data)
    get_factory(cfg.model.model)
    PRUNING[cfg.prune.prune_method]
    if cfg.optim.optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {cfg.optim.optimizer!r}; valid: {', '.join(sorted(OPTIMIZERS))}")


def check_batch(cfg: Config) -> None:
    """The checks that need the world size (the batch splits into the ranks' shards, the measurements
    asked for can be taken); the same answer on every rank."""
    train = cfg.train
    if train.batch_size % dist.size():
        raise ConfigError(f"--batch-size {train.batch_size} is not divisible by the {dist.size()} ranks")
    check_measurements(cfg, dist.size(), fused=False)


def check_fusable(cfg: Config) -> None:
    """Fused trials take only the measurements that can be fused (not the Lipschitz constant, whose probe
    runs one model's own passes), and train in the contiguous layout (their stacked parameters are one
    tensor per layer)."""
    check_measurements(cfg, dist.size(), fused=True)
    if cfg.train.memory_format != "contiguous":
        raise ConfigError("fused trials train in the contiguous layout: fuse 1, or memory_format contiguous")


def autocast(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    """The arithmetic of a trial's forward passes (``--precision``): bf16 autocast, or as it is."""
    if cfg.train.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def in_layout(x: torch.Tensor, cfg: Config) -> torch.Tensor:
    """A batch of images in the trial's ``--memory-format``."""
    if cfg.train.memory_format == "channels-last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def select_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", dist.local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def load_data_everywhere(cfg: Config, device: torch.device) -> Datasets:
    """The data on every rank, and proof that every rank read the same files (a node with a stale
    or partial copy would otherwise train on other data without a word)."""

    def load() -> Datasets:
        data = load_datasets(cfg.data)
        if cfg.train.report_test and data.test is None:
            raise DataError(f"--report-test: dataset {cfg.data.dataset} has no test split")
        return data.to(device)

    data = dist.agree(load, "loading the data")
    dist.verify_same_everywhere(data.fingerprint, f"{cfg.data.dataset} data (sha256 of the files' arrays)")
    return data


# -- the state, the evaluation and the recorder ------------------------------------------------


@dataclass
class TrialState:
    """What changes while a trial trains, and so exactly what its checkpoint stores: the ``progress()``
    scalars, the model and the optimizer. The same on every rank but ``loss_sums``."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    measures: list[Measurement]  # what is measured during training (their states are checkpointed)
    clock: float  # time.time() at wall time 0: the wall time continues across resumes
    loss_sums: torch.Tensor  # this rank's [sum of batch losses, batches] since the last evaluation
    step: int = 0
    best_val_error: float = math.inf
    evaluated_at: int | None = None  # the step of the last evaluation in the log (a resume's: its checkpoint's)

    @classmethod
    def begin(cls, model: nn.Module, optimizer: torch.optim.Optimizer, measures: list[Measurement],
              progress: Progress | None, t_init: float) -> "TrialState":
        """A fresh state (``progress`` None), or the checkpointed one (model and optimizer loaded already)."""
        device = next(model.parameters()).device
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        if progress is None:
            return cls(model, optimizer, measures, t_init, sums)
        for m in measures:
            m.restore(progress.measures.get(m.name, ()))
        if len(progress.train_loss) == dist.size():  # stopped between two evaluations: each rank's own sums
            sums += torch.tensor(progress.train_loss[dist.rank()], dtype=torch.float64, device=device)
        elif progress.train_loss and dist.rank() == 0:  # another world size: the total on rank 0
            sums += torch.tensor([sum(a for a, _ in progress.train_loss), sum(b for _, b in progress.train_loss)],
                                 dtype=torch.float64, device=device)
        return cls(model, optimizer, measures, time.time() - progress.wall_time, sums, progress.step,
                   progress.best_val_error, evaluated_at=progress.step)

    def progress(self, wall_time: float | None = None, train_loss: tuple[tuple[float, float], ...] = ()) -> Progress:
        wall = time.time() - self.clock if wall_time is None else wall_time
        return Progress(self.step, self.best_val_error, wall, train_loss, {m.name: m.state for m in self.measures})


class Evaluator:
    """Evaluates the trained model on a disjoint slice of a split per rank.

    On the CPU a convolutional model is evaluated through a channels-last twin, refreshed from the
    trained weights (a copy, values unchanged) before each evaluation: its forward pass is faster
    there (BENCHMARKS.md, benchmarks/eval_profile.py), and training itself, its layout and its numbers
    are untouched. Its logits differ from the plain model's only by float summation order (~1e-6).
    """

    def __init__(self, model: nn.Module, device: torch.device, cfg: Config):
        self.model, self.cfg = model, cfg
        self.loss_sum = summed(loss_for(cfg.model.model))
        self.twin: nn.Module | None = None
        if device.type == "cpu" and any(p.dim() == 4 for p in model.parameters()):
            self.twin = copy.deepcopy(model).requires_grad_(False).to(memory_format=torch.channels_last).eval()

    @torch.inference_mode()
    def __call__(self, split: Examples, batch_size: int) -> torch.Tensor:
        """[errors, examples, loss sum] over this rank's disjoint slice of ``split``."""
        part = eval_slice(len(split), dist.rank(), dist.size())
        if self.twin is not None:
            self.twin.load_state_dict(self.model.state_dict())
            model = self.twin
        else:
            model = self.model.eval()
        device = split.device
        errors = torch.zeros((), dtype=torch.float64, device=device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for start in range(part.start, part.stop, batch_size):
            x, target = split.rows(start, min(start + batch_size, part.stop))
            if self.twin is not None:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(self.cfg, device):
                logits = model(x).float()
            errors += (logits.argmax(dim=1) != target).sum()
            loss_sum += self.loss_sum(logits, target).double()
        self.model.train()
        count = torch.tensor(float(part.stop - part.start), dtype=torch.float64, device=device)
        return torch.stack([errors, count, loss_sum])


class Recorder:
    """Rank 0's record of one trial: its HDF5 log, its checkpoint and its final model. The engine calls
    every method on every rank inside ``dist.agree`` (the other ranks hold a NullRecorder), so a write
    that fails on rank 0 ends the trial on every rank, with the files on disk as they were."""

    def __init__(self, cfg: Config, path: Path, mask: Mask, bytes_per_step: int, data_fingerprint: str):
        self.cfg, self.path, self.mask, self.bytes_per_step = cfg, path, mask, bytes_per_step
        self.data_fingerprint = data_fingerprint
        self.mask_sha256 = mask.sha256()
        self.log = TrialLog(path)

    def open(self, resumed: Progress | None, attrs: Mapping[str, Any]) -> None:
        """A new log, or the resumed one without the evaluations made after its checkpoint (redone)."""
        plugins = json.dumps([p.to_dict() for p in registry.loaded()])
        if resumed is not None:
            before = {p["name"]: p["sha256"] for p in json.loads(read_log(self.path, with_mask=False).attrs.get("plugins", "[]"))}
            now = {p.name: p.sha256 for p in registry.loaded()}
            changed = {name for name in before.keys() | now.keys() if before.get(name) != now.get(name)}
            if changed:  # warned, not refused: the configuration (run hash) is the same; the log keeps the newest
                logger.warning("%s: resuming with plug-ins that changed since the trial began (%s): its measurements "
                               "before and after step %d may come from different code", self.path.name,
                               ", ".join(sorted(changed)), resumed.step)
            self.log.truncate(resumed.step, world_size=dist.size(),
                              latest={**{k: attrs[k] for k in ("placement", "fuse")}, "plugins": plugins})
            return
        import h5py  # noqa: F401 - fail here, not mid-run, if it is missing

        attrs = {
            **attrs,
            "config": self.cfg.to_json(), "run_hash": self.cfg.run_hash(), "world_size": dist.size(),
            "world_sizes": json.dumps([dist.size()]), "data_fingerprint": self.data_fingerprint,
            "mask_sha256": self.mask_sha256, "mask_density": self.mask.density,
            "mask_layer_density": json.dumps(self.mask.layer_density()),
            "allreduce_bytes_per_step": self.bytes_per_step, "hvd_sparse_version": hvd_sparse.__version__,
            "torch_version": torch.__version__, "horovod_version": dist.horovod_version(), "backend": dist.backend(),
            "plugins": plugins,
        }
        # plan_start has ruled out a finished log unless --overwrite; a RUNNING one without checkpoint restarts
        self.log = TrialLog.create(self.path, attrs, self.mask, overwrite=True)

    def _checkpoint(self, state: TrialState, progress: Progress) -> None:
        if self.cfg.run.checkpoint:
            started = time.perf_counter()
            save_checkpoint(self.path, progress, state.model, state.optimizer, self.cfg.run_hash(), self.mask_sha256,
                            self.data_fingerprint)
            PACE.note("checkpoint", time.perf_counter() - started)

    def evaluation(self, row: Mapping[str, float], state: TrialState | None) -> None:
        """One evaluation into the log; then a checkpoint of ``state`` unless the trial ends here (None)."""
        self.log.append(row)
        if state is not None:
            self._checkpoint(state, state.progress(wall_time=row["wall_time"]))

    def table(self, measure: Measurement, step: int, record: Mapping[str, Any]) -> None:
        """One row of a measurement's own table in the log."""
        self.log.append_table(measure.name, step, record, measure.table_attrs)

    def interrupted(self, why: str, state: TrialState, progress: Progress) -> None:
        self._checkpoint(state, progress)
        self.log.interrupted(why)

    def finish(self, status: str, steps_to_result: int | None, extra: Mapping[str, Any], model: nn.Module) -> None:
        if self.cfg.run.save_model:  # before the status: a trial recorded as ended has all its files
            params = {n: p.detach().cpu() for n, p in model.named_parameters()}
            write_atomically(final_model_path(self.path), lambda tmp: torch.save(params, tmp), "final model")
        self.log.finish(status, steps_to_result, **extra)
        if status != "CAPPED":  # a capped trial keeps its checkpoint: a study without capping resumes it
            checkpoint_path(self.path).unlink(missing_ok=True)  # an ended trial is never resumed


class NullRecorder(Recorder):
    """What the ranks other than 0 record: nothing."""

    def __init__(self) -> None:  # noqa: D107 - holds nothing
        pass

    def open(self, resumed: Progress | None, attrs: Mapping[str, Any]) -> None:
        pass

    def evaluation(self, row: Mapping[str, float], state: TrialState | None) -> None:
        pass

    def table(self, measure: Measurement, step: int, record: Mapping[str, Any]) -> None:
        pass

    def interrupted(self, why: str, state: TrialState, progress: Progress) -> None:
        pass

    def finish(self, status: str, steps_to_result: int | None, extra: Mapping[str, Any], model: nn.Module) -> None:
        pass


def final_model_path(log: Path) -> Path:
    return log.with_suffix(".final.pt")


# -- the loop ----------------------------------------------------------------------------------


class _LinesOut:
    """A stream for tqdm that turns each carriage-return refresh into a line of its own."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: int, enabled: bool) -> tqdm:
    """tqdm on a terminal; under a launcher (horovodrun, srun pipe output) a line every 30 s."""
    if sys.stderr.isatty():
        return tqdm(total=total, disable=not enabled, desc="train", unit="step", mininterval=1.0, file=sys.stderr)
    return tqdm(total=total, disable=not enabled, desc="train", unit="step", mininterval=30.0,
                file=_LinesOut(sys.stderr), ascii=True)


def grads_finite(models: Sequence[nn.Module]) -> list[bool]:
    """Per model, whether its averaged gradient is finite; the same answers on every rank (same
    values). One pass over all the gradients and one read of the answers (a GPU waits once)."""
    grads = [[p.grad for p in model.parameters() if p.grad is not None] for model in models]
    norms = torch._foreach_norm([g for per_model in grads for g in per_model])
    sums, start = [], 0
    for per_model in grads:
        sums.append(torch.stack(norms[start : start + len(per_model)]).sum())
        start += len(per_model)
    return torch.isfinite(torch.stack(sums)).tolist()


@dataclass(frozen=True)
class Job:
    """A trial to train: its configuration, its log's path and what else goes into its log (a
    study's trial id and metaparameters). Whoever hands it to the engine holds its lock."""

    cfg: Config
    path: Path
    attrs: Mapping[str, Any] = field(default_factory=dict)
    # capping (a study's): rank 0's current bound of the trial's cell, asked at every evaluation; None: no capping
    bound: Callable[[], Bound | None] | None = None
    reopen_capped: bool = False  # resume a CAPPED log from its checkpoint (a study run without capping)


@dataclass
class Slot:
    """One trial in the engine: its fixed parts, and ``state``, what changes. ``sync`` is its own
    gradient averaging, or None when it is fused with others (the engine's shared one)."""

    job: Job
    data: Datasets
    mask: Mask
    recorder: Recorder
    state: TrialState
    sync: gradsync.GradientSync | None
    bytes_per_step: int  # the trial's share of a step's gradient allreduce
    evaluator: Evaluator = field(init=False)
    batches: GlobalBatches = field(init=False)
    noise_masks: list[torch.Tensor | None] = field(init=False)  # the masks of its trainable parameters
    bar: tqdm = field(init=False)
    capped: Bound | None = None  # the bound that capped the trial (set when it stops as CAPPED)
    loss_fn: Loss = field(init=False)  # the model's mean loss (models.loss_for)

    def __post_init__(self) -> None:
        model, train = self.state.model, self.cfg.train
        self.loss_fn = loss_for(self.cfg.model.model)
        self.evaluator = Evaluator(model, self.data.device, self.cfg)
        self.batches = GlobalBatches(len(self.data.train), train.batch_size, seed_for(train.seed, "order"))
        self.noise_masks = self.mask.by_parameter(model)
        model.train()
        self.bar = progress_bar(train.max_steps, enabled=dist.is_root() and self.cfg.run.progress)
        self.bar.update(self.state.step)

    @property
    def cfg(self) -> Config:
        return self.job.cfg

    def evaluation_due(self) -> bool:
        step, train = self.state.step, self.cfg.train
        return (step % train.eval_every == 0 or step == train.max_steps) and step != self.state.evaluated_at

    def shard(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's examples of the trial's global batch at its current step."""
        x, y = self.data.train.batch(self.batches.shard(self.state.step, dist.rank(), dist.size()))
        return in_layout(x, self.cfg), y

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.state.model(x), y)

    def due(self) -> list[Measurement]:
        """The measurements taken at this step."""
        return [m for m in self.state.measures if m.due(self.state.step)]

    def record_table(self, measure: Measurement, record: Mapping[str, Any]) -> None:
        step = self.state.step
        dist.agree(lambda: self.recorder.table(measure, step, record), "writing the log")
        logger.info("%s", measure.describe(step, record))

    def reaches_goal(self, totals: list[float]) -> bool:
        errors, count, loss_sum = totals[:3]
        return math.isfinite(loss_sum / count) and errors / count <= self.cfg.train.goal_error

    def record_evaluation(self, totals: list[float], fused: bool, bound: Bound | None = None) -> tuple[str, int | None] | None:
        """Log the evaluation whose summed [errors, examples, loss sum, train-loss sum, batches] are
        ``totals``; checkpoint; (status, steps-to-result) if the trial ends here: COMPLETE, INFEASIBLE,
        or CAPPED when it missed the goal at or past ``bound`` (its checkpoint is kept, see Recorder)."""
        state, train = self.state, self.cfg.train
        errors, count, loss_sum, tl_sum, tl_n = totals
        state.loss_sums.zero_()
        state.evaluated_at = state.step
        row = {
            "step": state.step, "val_error": errors / count, "val_loss": loss_sum / count,
            "train_loss": tl_sum / tl_n if tl_n else math.nan, "wall_time": time.time() - state.clock,
            "allreduce_bytes": state.step * self.bytes_per_step,
            **{k: v for m in state.measures for k, v in m.row().items()},
        }
        state.best_val_error = min(state.best_val_error, row["val_error"])
        diverged, reached = not math.isfinite(row["val_loss"]), self.reaches_goal(totals)
        goes_on = not (diverged or reached) and state.step < train.max_steps  # checkpointed; a CAPPED one too
        dist.agree(lambda: self.recorder.evaluation(row, state if goes_on else None), "writing the log")
        self.bar.set_postfix(val_error=f"{row['val_error']:.4f}", refresh=False)
        logger.info("%sstep %d: val_error %.4f val_loss %.4f train_loss %.4f (%.1f s)",
                    f"{self.job.path.name}: " if fused else "", state.step, row["val_error"], row["val_loss"],
                    row["train_loss"], row["wall_time"])
        if diverged:
            return "INFEASIBLE", None
        if reached:
            return "COMPLETE", state.step
        if goes_on and capped_at(state.step, reached, bound):
            self.capped = bound
            logger.info("%sstep %d: capped (another trial of its cell reached the goal at step %d)",
                        f"{self.job.path.name}: " if fused else "", state.step, bound.steps)  # type: ignore[union-attr]
            return "CAPPED", None
        return None

    def finish(self, status: str, steps_to_result: int | None, fused: bool) -> TrialResult:
        """The test split if asked, then the log's final record (the model file first)."""
        self.bar.close()
        state, train = self.state, self.cfg.train
        extra: dict[str, float | int] = {"best_val_error": state.best_val_error, "steps_done": state.step}
        if status == "CAPPED" and self.capped is not None:
            extra.update(capping_bound=self.capped.steps, capped_by=self.capped.trial_id)
        test_error = None
        if train.report_test and self.data.test is not None:
            local = evaluate_slots([self], self.data.test, fused).reshape(-1).cpu()
            errors, count, loss_sum = dist.allreduce_sum(local, name="eval.test").tolist()
            test_error, extra["test_error"], extra["test_loss"] = errors / count, errors / count, loss_sum / count
        dist.agree(lambda: self.recorder.finish(status, steps_to_result, extra, state.model), "finishing the log")
        return TrialResult(
            status=status, steps_to_result=steps_to_result, best_val_error=state.best_val_error,
            steps_done=state.step, world_size=dist.size(), density=self.mask.density,
            layer_density=self.mask.layer_density(), mask_sha256=self.mask.sha256(), test_error=test_error,
            log_path=self.recorder.path if dist.is_root() else None,
        )


def evaluate_slots(slots: Sequence[Slot], split: Examples, fused: bool) -> torch.Tensor:
    """[len(slots), 3]: each trial's [errors, examples, loss sum] over this rank's slice of ``split``;
    fused trials on a GPU in one pass over the data (``fused.evaluate``). On the CPU fused trials are
    evaluated one by one, each through its channels-last twin: the grouped convolutions of a fused
    evaluation cost several times more there (BENCHMARKS.md, benchmarks/fuse_ops.py)."""
    batch_size = slots[0].cfg.train.eval_batch_size
    if not fused or split.device.type == "cpu":
        return torch.stack([slot.evaluator(split, batch_size) for slot in slots])
    part = eval_slice(len(split), dist.rank(), dist.size())
    totals = torch.zeros(len(slots), 3, dtype=torch.float64, device=split.device)
    rows = max(1, EVAL_ROWS // batch_size) * batch_size  # whole evaluation batches: a lazy split is never read whole
    for start in range(part.start, part.stop, rows):
        x, y = split.rows(start, min(start + rows, part.stop))
        with autocast(slots[0].cfg, split.device):
            totals += fused_ops.evaluate([slot.state.model for slot in slots], x, y, batch_size, slots[0].evaluator.loss_sum)
    return totals


EVAL_ROWS = 65536  # the examples a fused evaluation holds at once


Ended = Callable[[Job, TrialResult], None]


def encode(bound: Bound | None) -> list[float]:
    """A bound as two numbers that survive a sum with zeros (0, 0: none)."""
    return [0.0, 0.0] if bound is None else [bound.steps + 1.0, bound.trial_id + 1.0]


def decode(values: Sequence[float]) -> Bound | None:
    return None if values[0] == 0 else Bound(int(values[0]) - 1, int(values[1]) - 1)


class Engine:
    """Trains trials, ``fuse`` at a time on every rank: one trial (``fuse`` 1, ``train``), or up to
    ``fuse`` trials of one study cell (same model, data and batch size) as one fused model
    (``hvd_sparse.fused``), with one gradient allreduce per step for all of them. It is the same loop
    either way: every operation below runs over the trials it holds (its slots).

    ``next_job`` hands out the next trial (None: no more); a trial ends on its own (goal, budget,
    divergence) and ``ended`` receives its result; its slot is then filled with the next trial at once,
    so the number of trials trained together does not fade until the jobs run out. A stop signal
    checkpoints every trial held and raises ``Interrupted``.
    """

    def __init__(self, data: Datasets, fuse: int, next_job: Callable[[], Job | None], ended: Ended):
        self.data, self.fuse, self.next_job, self.ended = data, fuse, next_job, ended
        self.fused = fuse > 1
        self.slots: list[Slot] = []
        self.shared: gradsync.GradientSync | None = None  # the fused trials' gradient averaging

    @property
    def sync(self) -> gradsync.GradientSync:
        return self.shared if self.fused else self.slots[0].sync  # type: ignore[return-value]

    def run(self) -> None:
        """Until no trial is left; the loop of every trial held is evaluate when due, end if done,
        check for a stop signal, step."""
        try:
            self.loop()
        finally:
            for slot in self.slots:
                slot.bar.close()

    def loop(self) -> None:
        self.fill()
        while self.slots:
            started = time.perf_counter()
            evaluated = self.evaluate()
            if evaluated:  # with the checkpoint rank 0 writes after it (the others wait for it)
                PACE.note("evaluation", time.perf_counter() - started)
            done = [(slot, outcome) for slot, outcome in evaluated if outcome is not None]
            done += [(slot, ("CAPPED", None) if slot.capped else ("INCOMPLETE", None)) for slot in self.slots
                     if (slot.capped or slot.state.step == slot.cfg.train.max_steps)
                     and all(slot is not evaluated for evaluated, _ in done)]
            if done:
                self.end(done)
                continue  # the trials that took the free slots are evaluated at their start first
            if any(s.state.step % STOP_CHECK_EVERY == 0 for s in self.slots) and dist.any_rank(stop_requested(), "stop.check"):
                self.stop()
            started = time.perf_counter()
            finite = self.step()
            PACE.note("step", time.perf_counter() - started)
            failed = [slot for slot, ok in zip(list(self.slots), finite) if not ok]
            if failed:
                self.end([(slot, ("INFEASIBLE", None)) for slot in failed])

    def fill(self) -> None:
        """Free slots to the next trials; the fused trials' gradient averaging for the new set."""
        while len(self.slots) < self.fuse:
            job = self.next_job()
            if job is None:
                break
            self.slots.append(self.open(job))
        if self.fused and self.slots:
            kinds = {slot.cfg.dist.grad_compression for slot in self.slots}
            if len(kinds) > 1:
                raise ConfigError(f"fused trials must share their gradient compression, got {sorted(kinds)}")
            parts = [(s.state.optimizer, s.state.model, s.mask) for s in self.slots]
            self.shared = gradsync.gradient_sync(kinds.pop(), parts, fused=True)

    def end(self, outcomes: list[tuple[Slot, tuple[str, int | None]]]) -> None:
        for slot, (status, steps_to_result) in outcomes:
            result = slot.finish(status, steps_to_result, self.fused)
            self.slots.remove(slot)
            self.ended(slot.job, result)
        self.fill()

    def open(self, job: Job) -> Slot:
        """A trial's slot: fresh, or resumed from its checkpoint; its log opened."""
        cfg, path, t_init = job.cfg, job.path, time.time()
        if self.fused:
            check_fusable(cfg)
        ckpt = dist.on_root(lambda: plan_start(path, cfg.run_hash(), cfg.run.overwrite, self.data.fingerprint,
                                               reopen_capped=job.reopen_capped, world_size=dist.size(),
                                               strict_world_size=cfg.run.strict_world_size), "reading the earlier log")
        resumed: Progress | None = dist.broadcast_object(ckpt.progress if ckpt else None, name="progress")
        model, mask, optimizer, sync = build(cfg, self.data, ckpt, own_sync=not self.fused)
        trial = Trial(cfg, model, mask, self.data.train, summed(loss_for(cfg.model.model)), dist.rank(), dist.size(),
                      sum_over_ranks=lambda t: dist.allreduce_sum(t, name="measurement.sum"))
        state = TrialState.begin(model, optimizer, measurements_for(trial), resumed, t_init)
        logger.info(
            "world size %d, %s on %s: %d prunable parameters, density %.4f (mask %s)%s%s",
            dist.size(), cfg.model.model, cfg.data.dataset, mask.num_total, mask.density, mask.sha256()[:12],
            f", resuming at step {state.step}" if resumed else "", f", fused {self.fuse} at a time" if self.fused else "",
        )
        placement = dist.placement()
        hosts = Counter(p["host"] for p in placement)  # in the order of each host's first rank
        logger.info("placement: %s", ", ".join(f"{host} x{n}" for host, n in hosts.items()))
        bytes_per_step = gradsync.payload_bytes(cfg.dist.grad_compression, model, mask)
        recorder = Recorder(cfg, path, mask, bytes_per_step, self.data.fingerprint) if dist.is_root() else NullRecorder()
        attrs = {**job.attrs, "placement": json.dumps(placement), "fuse": self.fuse}
        dist.agree(lambda: recorder.open(resumed, attrs), "opening the log")
        slot = Slot(job, self.data, mask, recorder, state, sync, bytes_per_step)
        if resumed is not None and job.bound is not None:  # its last evaluation missed: capped now if past the bound
            bound = dist.broadcast_object(job.bound() if dist.is_root() else None, name="capping.bound")
            slot.capped = bound if capped_at(state.step, False, bound) and state.step < cfg.train.max_steps else None
        return slot

    def evaluate(self) -> list[tuple[Slot, tuple[str, int | None] | None]]:
        """The trials whose evaluation is due, evaluated together, their totals in one allreduce."""
        due = [slot for slot in self.slots if slot.evaluation_due()]
        if not due:
            return []
        val = evaluate_slots(due, self.data.val, self.fused)
        bounds = torch.tensor([encode(slot.job.bound() if slot.job.bound and dist.is_root() else None) for slot in due],
                              dtype=torch.float64, device=val.device)  # rank 0's, to every rank in the same sum
        local = torch.cat([val, torch.stack([slot.state.loss_sums for slot in due]), bounds], dim=1).reshape(-1).cpu()
        totals = dist.allreduce_sum(local, name="eval.totals").reshape(len(due), -1).tolist()
        # a trial of the cell that reaches the goal in this very round bounds the others at once
        reached = [Bound(slot.state.step, int(slot.job.attrs.get("trial_id", -1)))
                   for slot, t in zip(due, totals) if slot.reaches_goal(t)]
        return [(slot, slot.record_evaluation(t[:5], self.fused, tightest([decode(t[5:])] + reached) if slot.job.bound else None))
                for slot, t in zip(due, totals)]

    def losses(self, shards: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """Each trial's mean loss on its shard: fused, one forward for all (where it pays: on a CPU
        only at small batches, ``fused.pays``)."""
        x = shards[0][0]
        with autocast(self.slots[0].cfg, x.device):  # the trials of an engine share their precision (one cell)
            if not self.fused or not fused_ops.pays(x.device, len(x)):
                return [slot.loss(*shard) for slot, shard in zip(self.slots, shards)]
            xs, ys = zip(*shards)
            return list(fused_ops.losses([slot.state.model for slot in self.slots], torch.stack(xs), torch.stack(ys),
                                         self.slots[0].loss_fn))

    def step(self) -> list[bool]:
        """One optimizer step of every trial on this rank's shard of its global batch, with the
        measurements that are due (``hvd_sparse.measure``: before the step, on the local and the
        averaged gradients, after the step). Per trial: False if its averaged gradient is not finite
        (INFEASIBLE; its step is not taken, and it is not measured)."""
        slots, world, sync = self.slots, dist.size(), self.sync
        due = [slot.due() for slot in slots]
        for measures in due:
            for m in measures:
                m.before_step()
        shards = [slot.shard() for slot in slots]
        local = any(m.needs_local_gradient for measures in due for m in measures)
        sync.zero_grad()
        micro = slots[0].cfg.train.micro_batch_size  # the trials of an engine share it (one cell)
        local_sq = None
        if local or 0 < micro < len(shards[0][1]):  # every trial's own gradient, before the allreduce
            losses, local_sq = local_gradients(
                [slot.state.model for slot in slots], lambda part: self.losses([(x[part], y[part]) for x, y in shards]),
                len(shards[0][1]), [slot.noise_masks for slot in slots], halves=world == 1 and local, micro_batch=micro)
        else:
            losses = self.losses(shards)
            (losses[0] if len(losses) == 1 else torch.stack(losses).sum()).backward()
        sync.synchronize()  # p.grad: the average over ranks, masked
        finite = grads_finite([slot.state.model for slot in slots])
        contributions = []
        for i, measures in enumerate(due):
            for m in measures if finite[i] else []:
                given = m.after_average(float(local_sq[i]) if local_sq is not None and m.needs_local_gradient else None)
                if given is not None:
                    contributions.append((m, given))
        average_contributions(contributions, lambda t: dist.allreduce_mean(t, name="measurement.local"))
        for i, slot in enumerate(slots):
            if not finite[i]:
                continue
            state, train = slot.state, slot.cfg.train
            set_learning_rate(state.optimizer, learning_rate(slot.cfg.optim, state.step, train.max_steps))
            sync.step(i)
            slot.mask.apply_to_params(state.model)
            state.loss_sums[0] += losses[i].detach()
            state.loss_sums[1] += 1
            state.step += 1
            slot.bar.update(1)
            for m in due[i]:
                record = m.after_step()
                if record is not None:
                    slot.record_table(m, record)
        return finite

    def stop(self) -> NoReturn:
        """A stop signal reached some rank: checkpoint every trial at its step (with every rank's
        training-loss sums, so the resumed run measures exactly the same), mark the logs, raise
        Interrupted on every rank."""
        sums = dist.allgather_object([tuple(s.state.loss_sums.tolist()) for s in self.slots], name="stop.train_loss")
        names = "/".join(sorted(set(_received)) or ["a stop signal on another rank"])
        for i, slot in enumerate(self.slots):
            state, why = slot.state, f"{names} at step {slot.state.step}"
            progress = state.progress(train_loss=tuple(rank_sums[i] for rank_sums in sums))
            dist.agree(lambda: slot.recorder.interrupted(why, state, progress), "checkpointing on a stop signal")
            slot.bar.close()
        steps = ", ".join(str(slot.state.step) for slot in self.slots)
        resume = ("run the same command again to resume" if all(s.cfg.run.checkpoint for s in self.slots)
                  else "not checkpointed (--no-checkpoint)")
        raise Interrupted(f"stopped by {names} at step{'s' if len(self.slots) > 1 else ''} {steps}: {resume}")


# -- building a trial --------------------------------------------------------------------------


def prepare_mask(cfg: Config, model: nn.Module, data: Datasets, known: Mask | None) -> Mask:
    """Rank 0's mask on every rank, checksum-verified: ``known`` (a resumed run's, on rank 0) or the
    pruning method's.

    The method scores a copy of the model on rank 0 only (its BatchNorm layers, if any, by that rank's
    batches: no collective); the other ranks do not touch the data for it. A resumed mask keeps the
    parameters it names (a run begun by an older version may have pruned others).
    """
    resumed = dist.broadcast_object(list(known) if known is not None and dist.is_root() else None, name="mask.names")
    names = resumed or prunable_names(model, cfg.prune.prune_biases)
    ones = Mask.ones(model, names)
    kept_count(ones.num_total, cfg.prune.sparsity)  # on every rank, before rank 0's scores: the same error everywhere

    def compute() -> Mask:
        if known is not None:
            return known.to(next(model.parameters()).device)
        seed = cfg.train.seed if cfg.prune.snip_seed is None else cfg.prune.snip_seed
        with local_statistics():
            return prune(ScoreInput(copy.deepcopy(model), names, data.train, loss_for(cfg.model.model), cfg.prune, seed))

    return dist.broadcast_mask(dist.on_root(compute, "pruning at initialization"), ones)


def build(cfg: Config, data: Datasets, ckpt: Checkpoint | None, own_sync: bool
          ) -> tuple[nn.Module, Mask, torch.optim.Optimizer, gradsync.GradientSync | None]:
    """The model (rank 0's initial or checkpointed weights on every rank), its mask, its optimizer
    (rank 0's state on every rank) and, with ``own_sync``, the gradient synchronization it is trained
    through alone (Horovod's optimizer wraps it first: the state is loaded into the wrapper)."""
    device = data.device
    model = synced(build_model(cfg.model.model, data.input_shape, data.num_classes, seed_for(cfg.train.seed, "init")))
    check_batch_statistics(model, cfg, fused=not own_sync)  # BatchNorm over the global batch (also at np=1)
    model = model.to(device)
    if ckpt is not None:
        model.load_state_dict(ckpt.model)
    dist.broadcast_parameters(model)
    mask = prepare_mask(cfg, model, data, ckpt.mask if ckpt else None)  # SNIP in fp32 and NCHW: the same mask
    if cfg.train.memory_format == "channels-last":  # the same Parameter objects, their values unchanged
        model.to(memory_format=torch.channels_last)
    mask.apply_to_params(model)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    sync = gradsync.gradient_sync(cfg.dist.grad_compression, [(optimizer, model, mask)]) if own_sync else None
    optimizer = sync.optimizer if sync is not None else optimizer
    if ckpt is not None:
        optimizer.load_state_dict(ckpt.optimizer)
        contiguous_state(optimizer)
    dist.broadcast_optimizer_state(optimizer)
    mask.apply_to_params(model)  # the state broadcast may have stepped with zero gradients
    return model, mask, optimizer, sync


def check_batch_statistics(model: nn.Module, cfg: Config, fused: bool) -> None:
    """A model whose forward uses batch statistics (BatchNorm in training mode) trains at any world size
    with the global batch's statistics (``batchnorm.synced``), but is refused where the toolkit cannot
    keep it exact: fused trials stack parameters and not buffers, micro-batches would each be normalized
    by their own statistics, and so would what the measurements asked for (``Measurement.check``). The
    same answer on every rank (same model), before any collective."""
    norms = batch_statistics(model)
    if not norms:
        return
    where = f"{cfg.model.model} normalizes by batch statistics ({', '.join(norms[:3])}{', ...' if len(norms) > 3 else ''})"
    alone = unsynced(model)
    if alone and dist.size() > 1:
        raise ConfigError(f"{cfg.model.model}: {', '.join(alone[:3])}{', ...' if len(alone) > 3 else ''} would normalize by "
                          f"each rank's own statistics at {dist.size()} ranks (the toolkit synchronizes torch's "
                          "BatchNorm1d/2d/3d with running statistics, not subclasses or lazy ones): use those, or np=1")
    if fused:
        raise ConfigError(f"{where}: fused trials stack parameters, not buffers: fuse 1")
    check_measurements(cfg, dist.size(), fused, normalizes=where)
    if cfg.train.micro_batch_size:
        raise ConfigError(f"{where}: micro-batches would each be normalized by their own statistics: micro_batch_size 0")


def contiguous_state(optimizer: torch.optim.Optimizer) -> None:
    """The optimizer state (momentum buffers) in the default layout, as the other ranks create theirs:
    Horovod's broadcast copies bytes, so a channels-last buffer on rank 0 would arrive permuted. The
    update is elementwise, so a buffer's layout changes no value."""
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and not value.is_contiguous():
                state[key] = value.contiguous()


def run_trial(cfg: Config, path: Path, data: Datasets, attrs: Mapping[str, Any] | None = None) -> TrialResult:
    """Train one trial whose log is ``path`` on data already on the device, resuming it if it was
    interrupted; the caller holds its lock."""
    jobs, results = iter([Job(cfg, path, attrs or {})]), []
    Engine(data, 1, lambda: next(jobs, None), lambda job, result: results.append(result)).run()
    return results[0]
