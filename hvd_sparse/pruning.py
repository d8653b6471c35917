"""Pruning at initialization: a registry of score functions (SNIP its first entry; plug-ins add theirs
with ``hvd_sparse.register_pruning``) and the shared thresholding that turns scores into a ``Mask``.

A score function takes a ``ScoreInput`` (the model at its initial weights, the names of its prunable
parameters, the training split, the model's loss, the pruning config and a seed) and returns a score
tensor per name, of that parameter's shape: the entries with the highest scores are kept.

SNIP (Lee et al. 2019): prune at initialization by connection sensitivity |dL/dc| = |w * dL/dw|.

As the reference does: the *signed* dL/dc is summed over the batches (mean loss per batch), then the
absolute value is taken, normalized by its total, and the global top-k entries across all prunable
tensors are kept, k = round(N * (1 - sparsity)). Ties are broken by position (model order, then
flat index), so the same scores always give the same mask.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from hvd_sparse.config import ConfigError, PruneConfig, seed_for
from hvd_sparse.data import Examples
from hvd_sparse.mask import Mask, split_flat
from hvd_sparse.models import Loss, cross_entropy
from hvd_sparse.registry import Registry


def snip_batches(train: Examples, batch_size: int, num_batches: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of a seeded permutation of the training split; num_batches=0 is one full pass."""
    n = len(train)
    full_pass = math.ceil(n / batch_size)
    count = num_batches or full_pass
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed_for(seed, "snip")))
    for i in range(count):
        start = (i % full_pass) * batch_size
        yield train.batch(perm[start : start + batch_size])


def snip_scores(model: nn.Module, names: list[str], batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                loss_fn: Loss = cross_entropy) -> dict[str, torch.Tensor]:
    """Normalized |sum over batches of dL/dc| for each named parameter (sums to 1 overall); L: the model's
    mean loss."""
    params = dict(model.named_parameters())
    chosen = [params[n] for n in names]
    signed = [torch.zeros_like(p) for p in chosen]
    was_training = model.training
    model.eval()  # no dropout/batch-norm here, but the score must not depend on the mode
    for x, y in batches:
        loss = loss_fn(model(x), y)
        grads = torch.autograd.grad(loss, chosen)
        for acc, p, g in zip(signed, chosen, grads):
            acc.add_(g * p.detach())
    model.train(was_training)
    scores = [s.abs() for s in signed]
    total = sum(float(s.sum(dtype=torch.float64)) for s in scores)
    if total > 0:
        scores = [s / total for s in scores]
    return dict(zip(names, scores))


def kept_count(total: int, sparsity: float) -> int:
    """How many of ``total`` prunable entries a mask of ``sparsity`` keeps: round(N * (1 - sparsity)),
    at least one (ConfigError if the sparsity would keep none: a network of no weights trains nothing)."""
    k = int(round(total * (1.0 - sparsity)))
    if k < 1:
        raise ConfigError(f"--sparsity {sparsity!r} keeps none of the {total} prunable weights "
                          f"(at most {1 - 1 / total:.9g} keeps one)")
    return k


def top_k_mask(scores: dict[str, torch.Tensor], sparsity: float) -> Mask:
    """Keep exactly round(N * (1 - sparsity)) entries with the highest scores, ties by position."""
    flat = torch.cat([s.detach().reshape(-1).float().cpu() for s in scores.values()])
    k = kept_count(flat.numel(), sparsity)
    order = torch.argsort(flat, descending=True, stable=True)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[order[:k]] = True
    parts = split_flat(keep, [s.shape for s in scores.values()])
    return Mask({name: part.to(s.device) for (name, s), part in zip(scores.items(), parts)})


@dataclass(frozen=True)
class ScoreInput:
    """What a pruning score may use."""

    model: nn.Module  # at its initial weights (rank 0's, the same everywhere)
    names: list[str]  # its prunable parameters, in model order
    train: Examples  # the training split, on the device (``batch``, ``rows``)
    loss_fn: Loss  # the model's mean loss (models.loss_for)
    cfg: PruneConfig
    seed: int  # the trial's SNIP seed (--snip-seed, else --seed)


Score = Callable[[ScoreInput], dict[str, torch.Tensor]]
PRUNING: Registry[Score] = Registry("pruning method")  # plug-ins add theirs with hvd_sparse.register_pruning


@PRUNING.register("snip")
def snip_score(given: ScoreInput) -> dict[str, torch.Tensor]:
    """SNIP's connection sensitivity over ``snip_batches`` batches of ``snip_batch_size``."""
    batches = snip_batches(given.train, given.cfg.snip_batch_size, given.cfg.snip_batches, given.seed)
    return snip_scores(given.model, given.names, batches, given.loss_fn)


def prune(given: ScoreInput) -> Mask:
    """The mask of ``given.cfg.prune_method`` at ``given.cfg.sparsity``: its scores, then the global top-k."""
    if given.cfg.sparsity == 0.0:
        return Mask.ones(given.model, given.names)
    method = given.cfg.prune_method
    scores = PRUNING[method](given)
    params = dict(given.model.named_parameters())
    if not isinstance(scores, dict) or set(scores) != set(given.names) or any(
            not isinstance(scores[n], torch.Tensor) or scores[n].shape != params[n].shape for n in given.names):
        raise ConfigError(f"pruning method {method!r} must return a score tensor of each prunable parameter's shape, "
                          f"for exactly {given.names}")
    ordered = {n: scores[n].detach().to(params[n].device, torch.float32) for n in given.names}
    if not all(torch.isfinite(s).all() for s in ordered.values()):
        raise ConfigError(f"pruning method {method!r} gave scores that are not finite (NaN or infinite)")
    return top_k_mask(ordered, given.cfg.sparsity)


def snip(
    model: nn.Module,
    names: list[str],
    train: Examples,
    sparsity: float,
    *,
    batch_size: int = 100,
    num_batches: int = 0,
    seed: int = 0,
    loss_fn: Loss = cross_entropy,
) -> Mask:
    """The SNIP mask of ``model`` at its current (initial) weights: ``prune`` with the method snip."""
    cfg = PruneConfig(sparsity=sparsity, snip_batches=num_batches, snip_batch_size=batch_size)
    return prune(ScoreInput(model, names, train, loss_fn, cfg, seed))
