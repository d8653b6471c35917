"""One trial: build, prune with SNIP on rank 0, broadcast, train data-parallel, evaluate, log.

Run as ``horovodrun -np 2 python -m hvd_sparse.train --sparsity 0.9 ...`` (or under mpirun/srun).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TextIO

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import hvd_sparse
from hvd_sparse import dist
from hvd_sparse.checkpoint import RunLock, Start, checkpoint_path, plan_start, save_checkpoint
from hvd_sparse.config import Config, ConfigError, TrainConfig, parse_config
from hvd_sparse.data import DATASETS, DataError, Datasets, GlobalBatches, Split, check_data_dir, eval_slice, load_datasets, seed_for
from hvd_sparse.log import StorageError, TrialLog, check_writable, write_atomically
from hvd_sparse.mask import Mask
from hvd_sparse.models import MODELS, build_model, get_factory, prunable_names
from hvd_sparse.noise import NoiseScale, local_gradients, masked_sq_norm, masks_of
from hvd_sparse.optim import OPTIMIZERS, build_optimizer, learning_rate, set_learning_rate
from hvd_sparse.pruning import snip

logger = logging.getLogger("hvd_sparse")

PROG = "hvd_sparse.train"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STOP_CHECK_EVERY = 10  # steps between the collective checks for a stop signal
_received: list[int] = []  # stop signals this process received


class Interrupted(Exception):
    """A stop signal reached a rank: the trial checkpointed at an agreed step and the job should end
    (exit 0, so that a scheduler can requeue it); running the same command again resumes."""


def report_interrupted(error: Interrupted) -> int:
    """Rank 0 says so; and where the launcher asked (launch/srun-resumable sets
    HVD_SPARSE_INTERRUPTED_FILE), it leaves that file, so the job is requeued only if the ranks
    really stopped and checkpointed (not when a late signal met a trial that ended anyway)."""
    if dist.is_root():
        say(f"INTERRUPTED: {error}")
        marker = os.environ.get("HVD_SPARSE_INTERRUPTED_FILE")
        if marker:
            Path(marker).write_text(f"{error}\n")
    return 0


def install_stop_handlers() -> None:
    """SIGTERM and SIGUSR1 (SLURM's preemption and time-limit warnings) stop training cleanly."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: _received.append(signum))


def stop_requested() -> bool:
    """Whether this process received a stop signal."""
    return bool(_received)


@dataclass(frozen=True)
class TrialResult:
    status: str  # COMPLETE, INCOMPLETE or INFEASIBLE
    steps_to_result: int | None
    best_val_error: float
    steps_done: int
    world_size: int
    density: float
    layer_density: dict[str, float]
    mask_sha256: str
    test_error: float | None
    log_path: Path | None


def validate(cfg: Config) -> None:
    """Checks that need no data and no ranks, so every rank fails fast and identically."""
    check_data_dir(cfg.data)
    get_factory(cfg.model.model)
    if cfg.optim.optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {cfg.optim.optimizer!r}; valid: {', '.join(sorted(OPTIMIZERS))}")


def log_path(cfg: Config) -> Path:
    c = cfg
    name = (
        f"{c.data.dataset}_{c.model.model}_{c.optim.optimizer}_s{c.prune.sparsity:g}"
        f"_b{c.train.batch_size}_{c.run_hash()}.h5"
    )
    return Path(c.run.out) / name


def configure_logging(level: str, is_root: bool) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        level=getattr(logging, level.upper()) if is_root else logging.WARNING,
        force=True,
    )


def select_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", dist.local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


class Evaluator:
    """Evaluates the trained model on a disjoint slice of a split per rank.

    On the CPU a convolutional model is evaluated through a channels-last twin, refreshed from the
    trained weights (a copy, values unchanged) before each evaluation: its forward pass is about
    1.7x faster there (benchmarks/eval_profile.py), and training itself, its layout and its numbers
    are untouched. Its logits differ from the plain model's only by float summation order (~1e-6).
    """

    def __init__(self, model: nn.Module, device: torch.device):
        self.model = model
        self.twin: nn.Module | None = None
        if device.type == "cpu" and any(p.dim() == 4 for p in model.parameters()):
            self.twin = copy.deepcopy(model).requires_grad_(False).to(memory_format=torch.channels_last).eval()

    @torch.inference_mode()
    def __call__(self, split: Split, batch_size: int) -> torch.Tensor:
        """[errors, examples, loss sum] over this rank's disjoint slice of ``split``."""
        part = eval_slice(len(split), dist.rank(), dist.size())
        x, y = split.x[part], split.y[part]
        if self.twin is not None:
            self.twin.load_state_dict(self.model.state_dict())
            model, x = self.twin, x.contiguous(memory_format=torch.channels_last)
        else:
            model = self.model.eval()
        errors = torch.zeros((), dtype=torch.float64, device=x.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
        for start in range(0, len(y), batch_size):
            logits = model(x[start : start + batch_size])
            target = y[start : start + batch_size]
            errors += (logits.argmax(dim=1) != target).sum()
            loss_sum += F.cross_entropy(logits, target, reduction="sum").double()
        self.model.train()
        return torch.stack([errors, torch.tensor(float(len(y)), dtype=torch.float64, device=x.device), loss_sum])


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


def grads_finite(model: nn.Module) -> bool:
    """Whether the averaged gradient is finite; the same answer on every rank (same values)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norms = torch._foreach_norm(grads)
    return bool(torch.isfinite(torch.stack(norms).sum()))


def prepare_mask(cfg: Config, model: nn.Module, data: Datasets, known: Mask | None) -> Mask:
    """Rank 0's mask on every rank, checksum-verified: ``known`` (a resumed run's) or SNIP's.

    SNIP runs on rank 0 only; the other ranks do not touch the data for it.
    """
    names = prunable_names(model, cfg.prune.prune_biases)

    def compute() -> Mask | None:
        if not dist.is_root():
            return None
        if known is not None:
            return known.to(next(model.parameters()).device)
        return snip(
            model, names, data.train, cfg.prune.sparsity,
            batch_size=cfg.prune.snip_batch_size, num_batches=cfg.prune.snip_batches,
            seed=cfg.train.seed if cfg.prune.snip_seed is None else cfg.prune.snip_seed,
        )

    mask = dist.agree(compute, "SNIP")
    return dist.broadcast_mask(mask, Mask.ones(model, names))


def load_data(cfg: Config, device: torch.device) -> Datasets:
    data = load_datasets(cfg.data)
    if cfg.train.report_test and data.test is None:
        raise DataError(f"--report-test: dataset {cfg.data.dataset} has no test split")
    return data.to(device)


def evaluate_all(evaluate: Evaluator, split: Split, batch_size: int, name: str) -> tuple[float, float]:
    """(error, mean loss) over the whole split, every rank evaluating a disjoint slice."""
    errors, count, loss_sum = dist.allreduce_sum(evaluate(split, batch_size).cpu(), name=name).tolist()
    return errors / count, loss_sum / count


def create_log(cfg: Config, path: Path, mask: Mask, bytes_per_step: int,
               extra_attrs: Mapping[str, Any]) -> TrialLog | None:
    if not dist.is_root():
        return None
    import h5py  # noqa: F401 - fail here, not mid-run, if it is missing

    attrs = {
        **extra_attrs,
        "config": cfg.to_json(),
        "run_hash": cfg.run_hash(),
        "world_size": dist.size(),
        "mask_sha256": mask.sha256(),
        "mask_density": mask.density,
        "mask_layer_density": json.dumps(mask.layer_density()),
        "allreduce_bytes_per_step": bytes_per_step,
        "hvd_sparse_version": hvd_sparse.__version__,
        "torch_version": torch.__version__,
        "horovod_version": dist.horovod_version(),
    }
    # plan_start has ruled out a finished log unless --overwrite; a RUNNING one without checkpoint restarts
    return TrialLog.create(path, attrs, mask, overwrite=True)


def start_job(cfg: Config) -> None:
    """Checks before any collective, then Horovod, logging and the checks that need the world size."""
    validate(cfg)
    dist.init()
    configure_logging(cfg.run.log_level, dist.is_root())
    check_batch(cfg.train)
    dist.verify_same_everywhere(cfg.run_hash(), "configuration (every rank must be given the same arguments)")
    dist.agree(lambda: check_writable(Path(cfg.run.out), "--out") if dist.is_root() else None,
               "checking the output folder")


def load_data_everywhere(cfg: Config, device: torch.device) -> Datasets:
    """The data on every rank, and proof that every rank read the same files (a node with a stale
    or partial copy would otherwise train on other data without a word)."""
    data = dist.agree(lambda: load_data(cfg, device), "loading the data")
    dist.verify_same_everywhere(data.fingerprint, f"{cfg.data.dataset} data (sha256 of the files' arrays)")
    return data


def check_batch(train: TrainConfig) -> None:
    """The checks that need the world size; the same answer on every rank."""
    if train.batch_size % dist.size():
        raise ConfigError(f"--batch-size {train.batch_size} is not divisible by the {dist.size()} ranks")
    if train.noise_scale_every and dist.size() == 1 and (train.batch_size < 2 or train.batch_size % 2):
        raise ConfigError(f"--noise-scale-every at np=1 splits the batch in two halves: --batch-size {train.batch_size} "
                          "must be even")


def run(cfg: Config) -> TrialResult:
    """One trial on all ranks of the current Horovod job (resumed if it was interrupted)."""
    start_job(cfg)
    device = select_device()
    data = load_data_everywhere(cfg, device)
    path = log_path(cfg)
    lock = RunLock(path)
    dist.agree(lambda: lock.acquire() if dist.is_root() else None, "locking the run")
    try:
        return run_trial(cfg, path, data)
    finally:
        lock.release()


def run_trial(cfg: Config, path: Path, data: Datasets, attrs: Mapping[str, Any] | None = None) -> TrialResult:
    """Train one trial whose log is ``path`` on data already on the device; the caller holds its lock.

    ``attrs`` are stored in the log (a study's trial id and metaparameters).
    """
    world, rank = dist.size(), dist.rank()
    t_init = time.time()
    device = data.train.x.device
    batches = GlobalBatches(len(data.train), cfg.train.batch_size, seed_for(cfg.train.seed, "order"))
    ckpt = dist.agree(lambda: plan_start(path, cfg.run_hash(), cfg.run.overwrite) if dist.is_root() else None,
                      "reading the earlier log")
    start: Start = dist.broadcast_object(ckpt.start if ckpt else Start(), name="start")

    model = build_model(cfg.model.model, data.input_shape, data.num_classes, seed_for(cfg.train.seed, "init")).to(device)
    evaluate = Evaluator(model, device)
    if ckpt is not None:
        model.load_state_dict(ckpt.model)
    dist.broadcast_parameters(model)
    mask = prepare_mask(cfg, model, data, ckpt.mask if ckpt else None)
    mask.apply_to_params(model)
    mask_sha256, run_hash = mask.sha256(), cfg.run_hash()  # fixed for the run; not recomputed per evaluation
    logger.info(
        "world size %d, %s on %s: %d prunable parameters, density %.4f (mask %s)%s",
        world, cfg.model.model, cfg.data.dataset, mask.num_total, mask.density, mask_sha256[:12],
        f", resuming at step {start.step}" if start.resumed else "",
    )
    sync = dist.gradient_sync(cfg.dist.grad_compression, build_optimizer(model.parameters(), cfg.optim), model, mask)
    if ckpt is not None:
        sync.optimizer.load_state_dict(ckpt.optimizer)
    dist.broadcast_optimizer_state(sync.optimizer)
    mask.apply_to_params(model)  # the state broadcast may have stepped with zero gradients
    noise = NoiseScale(cfg.train.noise_scale_smoothing)
    noise.restore(start.noise)
    masks = masks_of(model, mask) if cfg.train.noise_scale_every else []

    def cross_entropy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    def open_log() -> TrialLog | None:
        if not dist.is_root():
            return None
        if start.resumed:
            trial_log = TrialLog(path)
            trial_log.truncate(start.step)  # evaluations logged after the checkpoint are redone
            return trial_log
        return create_log(cfg, path, mask, sync.bytes_per_step, attrs or {})

    trial_log = dist.agree(open_log, "opening the log")

    status, steps_to_result, best = "INCOMPLETE", None, start.best_val_error
    t0 = time.time() - start.wall_time if start.resumed else t_init  # wall time continues across resumes
    train_loss_acc = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of local batch losses, batches]
    if len(start.train_loss) == world:  # resumed between two evaluations: each rank's own sums
        train_loss_acc += torch.tensor(start.train_loss[rank], dtype=torch.float64, device=device)
    elif start.train_loss and rank == 0:  # another world size: the total on rank 0
        train_loss_acc += torch.tensor([sum(a for a, _ in start.train_loss), sum(b for _, b in start.train_loss)],
                                       dtype=torch.float64, device=device)
    bar = progress_bar(cfg.train.max_steps, enabled=dist.is_root() and cfg.run.progress)
    bar.update(start.step)
    step = start.step
    model.train()
    while True:
        due = step % cfg.train.eval_every == 0 or step == cfg.train.max_steps
        if due and not (start.resumed and step == start.step):  # the resume step's evaluation is logged
            local = torch.cat([evaluate(data.val, cfg.train.eval_batch_size), train_loss_acc]).cpu()
            totals = dist.allreduce_sum(local, name="eval.totals")
            errors, count, loss_sum, tl_sum, tl_n = totals.tolist()
            train_loss_acc.zero_()
            val_error = errors / count
            row = {
                "step": step, "val_error": val_error, "val_loss": loss_sum / count,
                "train_loss": tl_sum / tl_n if tl_n else math.nan, "wall_time": time.time() - t0,
                "allreduce_bytes": step * sync.bytes_per_step,
                "noise_scale": noise.b_simple, "grad_sq": noise.grad_sq, "grad_trace": noise.grad_trace,
            }
            best = min(best, val_error)
            reached = val_error <= cfg.train.goal_error or not math.isfinite(row["val_loss"])

            def record() -> None:
                if trial_log is None:
                    return
                trial_log.append(row)
                if cfg.run.checkpoint and not reached and step < cfg.train.max_steps:
                    save_checkpoint(path, Start(step, best, row["wall_time"], resumed=True, noise=noise.state), model,
                                    sync.optimizer, run_hash, mask_sha256)

            dist.agree(record, "writing the log")
            bar.set_postfix(val_error=f"{val_error:.4f}", refresh=False)
            logger.info(
                "step %d: val_error %.4f val_loss %.4f train_loss %.4f (%.1f s)",
                step, val_error, row["val_loss"], row["train_loss"], row["wall_time"],
            )
            if not math.isfinite(row["val_loss"]):
                status = "INFEASIBLE"
                break
            if val_error <= cfg.train.goal_error:
                status, steps_to_result = "COMPLETE", step
                break
        if step == cfg.train.max_steps:
            break
        if step % STOP_CHECK_EVERY == 0 and dist.any_rank(stop_requested(), "stop.check"):
            stop_here(cfg, path, trial_log, model, sync.optimizer, train_loss_acc,
                      Start(step, best, time.time() - t0, resumed=True, noise=noise.state), run_hash, mask_sha256)
        idx = batches.shard(step, rank, world).to(device)
        x, y = data.train.x[idx], data.train.y[idx]
        measure = cfg.train.noise_scale_every > 0 and step % cfg.train.noise_scale_every == 0
        sync.zero_grad()
        if measure:  # this rank's own gradient, before the allreduce, and its norm
            loss, local_sq = local_gradients(model, cross_entropy, x, y, masks, halves=world == 1)
        else:
            loss = cross_entropy(x, y)
            loss.backward()
        sync.synchronize()  # p.grad: the average over ranks, masked
        if not grads_finite(model):
            status = "INFEASIBLE"
            break
        if measure:
            measure_noise(noise, local_sq, model, masks, cfg.train.batch_size, world)
        set_learning_rate(sync.optimizer, learning_rate(cfg.optim, step, cfg.train.max_steps))
        sync.step()
        mask.apply_to_params(model)
        train_loss_acc[0] += loss.detach()
        train_loss_acc[1] += 1
        step += 1
        bar.update(1)
    bar.close()

    extra: dict[str, float | int] = {"best_val_error": best, "steps_done": step}
    test_error = None
    if cfg.train.report_test and data.test is not None:
        test_error, extra["test_loss"] = evaluate_all(evaluate, data.test, cfg.train.eval_batch_size, "eval.test")
        extra["test_error"] = test_error

    def finish_log() -> None:
        if trial_log is None:
            return
        if cfg.run.save_model:  # before the status: a trial recorded as ended has all its files
            params = {n: p.detach().cpu() for n, p in model.named_parameters()}
            write_atomically(final_model_path(path), lambda tmp: torch.save(params, tmp), "final model")
        trial_log.finish(status, steps_to_result, **extra)
        checkpoint_path(path).unlink(missing_ok=True)  # an ended trial is never resumed

    dist.agree(finish_log, "finishing the log")
    return TrialResult(
        status=status, steps_to_result=steps_to_result, best_val_error=best, steps_done=step,
        world_size=world, density=mask.density, layer_density=mask.layer_density(), mask_sha256=mask_sha256,
        test_error=test_error, log_path=path if dist.is_root() else None,
    )


def measure_noise(noise: NoiseScale, local_sq: torch.Tensor, model: nn.Module, masks: list[torch.Tensor | None],
                  batch_size: int, world: int) -> None:
    """One scalar allreduce: the mean over ranks of |local gradient|^2 (batch B/k; at np=1, of the two
    halves, B/2) beside |averaged gradient|^2 (batch B), into the noise-scale estimates."""
    small = dist.allreduce_mean(local_sq.reshape(1).cpu(), name="noise.local_sq").item()
    big = masked_sq_norm([p.grad for p in model.parameters() if p.requires_grad], masks).item()
    noise.update(small, big, batch_size // max(world, 2), batch_size)


def stop_here(cfg: Config, path: Path, trial_log: TrialLog | None, model: nn.Module, optimizer: torch.optim.Optimizer,
              train_loss_acc: torch.Tensor, start: Start, run_hash: str, mask_sha256: str) -> None:
    """A stop signal reached some rank: checkpoint this step (with every rank's training-loss sums,
    so the resumed run measures exactly the same), mark the log, raise Interrupted on every rank."""
    pairs = dist.allgather_object(tuple(train_loss_acc.tolist()), name="stop.train_loss")
    names = sorted({signal.Signals(s).name for s in _received}) or ["a stop signal on another rank"]
    why = f"{'/'.join(names)} at step {start.step}"

    def record() -> None:
        if trial_log is None:
            return
        if cfg.run.checkpoint:
            save_checkpoint(path, dataclasses.replace(start, train_loss=tuple(pairs)), model, optimizer, run_hash,
                            mask_sha256)
        trial_log.interrupted(why)

    dist.agree(record, "checkpointing on a stop signal")
    resume = "run the same command again to resume" if cfg.run.checkpoint else "not checkpointed (--no-checkpoint)"
    raise Interrupted(f"stopped by {why}: {resume}")


def final_model_path(log: Path) -> Path:
    return log.with_suffix(".final.pt")


def say(text: str, stream: TextIO | None = None) -> None:
    """Whole lines in one write: launchers tag and interleave ranks' output per write() chunk."""
    stream = stream or sys.stdout
    stream.write(text + "\n")
    stream.flush()


def fail(error: Exception, code: int, prog: str = PROG) -> int:
    """One error line on this rank; every rank that fails together leaves together."""
    say(f"{prog}: error: {error}", sys.stderr)
    dist.exit_barrier()
    return code


def guarded(body: Callable[[], int], prog: str = PROG) -> int:
    """A command's body with the stop handlers installed, and its exit code: each failure one line."""
    install_stop_handlers()
    try:
        return body()
    except Interrupted as e:
        return report_interrupted(e)
    except ValueError as e:  # ConfigError, DataError, LogError, unknown registry names
        return fail(e, 2, prog)
    except (dist.DistributedError, StorageError) as e:
        return fail(e, 1, prog)
    except dist.PeerFailure:
        return fail(RuntimeError(dist.PEER_FAILURE_MESSAGE), 1, prog)


def main(argv: Sequence[str] | None = None) -> int:
    names = {"dataset": sorted(DATASETS), "model": sorted(MODELS), "optimizer": list(OPTIMIZERS)}
    return guarded(lambda: report(run(parse_config(argv, PROG, __doc__.splitlines()[0], names))))


def report(result: TrialResult) -> int:
    if dist.is_root():
        reached = "-" if result.steps_to_result is None else result.steps_to_result
        test = "" if result.test_error is None else f" test_error={result.test_error:.4f}"
        say(
            f"{result.status}: steps_to_result={reached} best_val_error={result.best_val_error:.4f}{test} "
            f"steps={result.steps_done} world_size={result.world_size} density={result.density:.4f}\n"
            "layer density: " + " ".join(f"{n}={d:.3f}" for n, d in result.layer_density.items()) + "\n"
            f"log: {result.log_path}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
