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

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from hvd_sparse.config import ConfigError, PruneConfig, seed_for
from hvd_sparse.config import structure as parse_structure
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
    return threshold(scores, sparsity)


def nm_eligible(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Where an N:M structure allows an entry to be kept: along each output unit's flattened inputs (a
    weight's first dimension is its output), in every group of M consecutive entries the N with the
    highest scores (ties by position); a last group of fewer than M entries keeps at most N of them.
    A 1-D tensor (a bias) is not structured: every entry is eligible."""
    if score.dim() < 2:
        return torch.ones_like(score, dtype=torch.bool)
    rows = score.reshape(score.shape[0], -1)
    length = rows.shape[1]
    groups = -(-length // m)
    padded = torch.full((rows.shape[0], groups * m), -math.inf, dtype=rows.dtype, device=rows.device)
    padded[:, :length] = rows
    order = torch.argsort(padded.reshape(rows.shape[0], groups, m), dim=2, descending=True, stable=True)
    eligible = torch.zeros(rows.shape[0], groups, m, dtype=torch.bool, device=rows.device)
    eligible.scatter_(2, order[:, :, :n], True)
    return eligible.reshape(rows.shape[0], -1)[:, :length].reshape(score.shape)


def _keep_top(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest of ``flat`` (float64 scores, -inf where not eligible), ties by position."""
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.argsort(flat, descending=True, stable=True)[:k]] = True
    return keep


def threshold(scores: dict[str, torch.Tensor], sparsity: float, scope: str = "global", structure: str = "") -> Mask:
    """The mask that keeps the highest scores: round(N (1 - sparsity)) entries over all tensors together
    (``global``), or round(n (1 - sparsity)) of each tensor of n entries, at least one (``layerwise``);
    with ``structure`` N:M only among the entries ``nm_eligible`` allows. Ties by position (model order,
    then flat index). Scores are compared in float64 (SynFlow's can be smaller than float32 holds)."""
    values = {name: s.detach().cpu().double() for name, s in scores.items()}
    if structure:
        n, m = parse_structure(structure)
        values = {name: v.masked_fill(~nm_eligible(v, n, m), -math.inf) for name, v in values.items()}
    eligible = sum(int(torch.isfinite(v).sum()) for v in values.values())
    if scope == "layerwise":
        parts = [_keep_top(v.reshape(-1), min(max(1, round(v.numel() * (1.0 - sparsity))), int(torch.isfinite(v).sum())))
                 for v in values.values()]
    else:
        total = sum(v.numel() for v in values.values())
        k = kept_count(total, sparsity)
        if k > eligible:
            raise ConfigError(f"--prune-structure {structure} allows {eligible} of the {total} prunable weights, "
                              f"fewer than the {k} that --sparsity {sparsity:g} keeps")
        parts = split_flat(_keep_top(torch.cat([v.reshape(-1) for v in values.values()]), k),
                           [v.shape for v in values.values()])
    return Mask({name: part.reshape(s.shape).to(s.device) for (name, s), part in zip(scores.items(), parts)})


@dataclass(frozen=True)
class ScoreInput:
    """What a pruning score may use.

    Attributes:
        model: the model at its initial weights (rank 0's, the same on every rank); in round k > 1 of an
            iterative pruning, a copy with the previous round's mask applied.
        names: its prunable parameters, in model order; the score returns a tensor of each one's shape.
        train: the training split on the device: ``train.batch(idx)`` the examples at ``idx``,
            ``train.rows(a, b)`` a range of them.
        loss_fn: the model's mean loss over a batch (cross-entropy unless its plug-in defines ``loss``).
        cfg: the pruning configuration (``--prune-*``, ``--snip-*``, ``--grasp-temperature``).
        seed: the trial's SNIP seed (``--snip-seed``, else ``--seed``).
        round: which round of an iterative pruning this is (1 when there is one).
    """

    model: nn.Module  # at its initial weights (rank 0's, the same everywhere); in round k > 1 of an
    #                   iterative pruning, a copy with the previous round's mask applied
    names: list[str]  # its prunable parameters, in model order
    train: Examples  # the training split, on the device (``batch``, ``rows``)
    loss_fn: Loss  # the model's mean loss (models.loss_for)
    cfg: PruneConfig
    seed: int  # the trial's SNIP seed (--snip-seed, else --seed)
    round: int = 1  # which round of ``rounds(cfg)`` this is


Score = Callable[[ScoreInput], dict[str, torch.Tensor]]
PRUNING: Registry[Score] = Registry("pruning method")  # plug-ins add theirs with hvd_sparse.register_pruning
OWN_ROUNDS = {"synflow": 100}  # a method's rounds when --prune-iterations is 0 (the others: 1)


def rounds(cfg: PruneConfig) -> int:
    return cfg.prune_iterations or OWN_ROUNDS.get(cfg.prune_method, 1)


def _chosen(given: ScoreInput, model: nn.Module | None = None) -> list[torch.Tensor]:
    params = dict((model or given.model).named_parameters())
    return [params[n] for n in given.names]


@PRUNING.register("snip")
def snip_score(given: ScoreInput) -> dict[str, torch.Tensor]:
    """SNIP's connection sensitivity over ``snip_batches`` batches of ``snip_batch_size``."""
    batches = snip_batches(given.train, given.cfg.snip_batch_size, given.cfg.snip_batches, given.seed)
    return snip_scores(given.model, given.names, batches, given.loss_fn)


@PRUNING.register("grasp")
def grasp_score(given: ScoreInput) -> dict[str, torch.Tensor]:
    """GraSP (Wang et al. 2020) on SNIP's batches, logits divided by the temperature: g = dL/dw summed
    over the batches (no graph), then Hg = d(g . dL/dw)/dw; its score -w * Hg marks the weights to
    *remove* (the highest), so the score to keep is w * Hg, normalized by its absolute sum."""
    model, temperature = given.model, given.cfg.grasp_temperature
    chosen = _chosen(given)
    was_training = model.training
    model.eval()
    batches = list(snip_batches(given.train, given.cfg.snip_batch_size, given.cfg.snip_batches, given.seed))
    g = [torch.zeros_like(p) for p in chosen]
    for x, y in batches:
        for acc, d in zip(g, torch.autograd.grad(given.loss_fn(model(x) / temperature, y), chosen)):
            acc.add_(d)
    hg = [torch.zeros_like(p) for p in chosen]
    for x, y in batches:
        grads = torch.autograd.grad(given.loss_fn(model(x) / temperature, y), chosen, create_graph=True)
        z = sum((a * d).sum() for a, d in zip(g, grads))
        for acc, d in zip(hg, torch.autograd.grad(z, chosen)):
            acc.add_(d)
    model.train(was_training)
    scores = [p.detach() * h for p, h in zip(chosen, hg)]
    total = sum(float(s.abs().sum(dtype=torch.float64)) for s in scores)
    return {n: s / total if total > 0 else s for n, s in zip(given.names, scores)}


@PRUNING.register("synflow")
def synflow_score(given: ScoreInput) -> dict[str, torch.Tensor]:
    """SynFlow (Tanaka et al. 2020), data-free, in float64: every parameter replaced by its absolute
    value, one all-ones input of the data's shape, R = the sum of the output; score |w * dR/dw|. Its
    rounds (``--prune-iterations``, 100 by default) are ``prune``'s."""
    model = copy.deepcopy(given.model).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.abs_()
    x, _ = given.train.rows(0, 1)
    chosen = _chosen(given, model)
    grads = torch.autograd.grad(model(torch.ones_like(x, dtype=torch.float64)).sum(), chosen)
    return {n: (p.detach() * g).abs() for n, p, g in zip(given.names, chosen, grads)}


@PRUNING.register("magnitude")
def magnitude_score(given: ScoreInput) -> dict[str, torch.Tensor]:
    """|w| at initialization."""
    return {n: p.detach().abs() for n, p in zip(given.names, _chosen(given))}


@PRUNING.register("random")
def random_score(given: ScoreInput) -> dict[str, torch.Tensor]:
    """Seeded uniform scores (from the trial's SNIP seed and the round): with the global scope every
    weight is equally likely kept, with the layer-wise one each tensor keeps the target density."""
    g = torch.Generator().manual_seed(seed_for(given.seed, "random-prune", given.round))
    return {n: torch.rand(p.shape, generator=g, dtype=torch.float64) for n, p in zip(given.names, _chosen(given))}


def _checked(method: str, scores: object, given: ScoreInput) -> dict[str, torch.Tensor]:
    params = dict(given.model.named_parameters())
    if not isinstance(scores, dict) or set(scores) != set(given.names) or any(
            not isinstance(scores[n], torch.Tensor) or scores[n].shape != params[n].shape for n in given.names):
        raise ConfigError(f"pruning method {method!r} must return a score tensor of each prunable parameter's shape, "
                          f"for exactly {given.names}")
    ordered = {n: scores[n].detach().to(params[n].device) for n in given.names}
    if not all(torch.isfinite(s).all() for s in ordered.values()):
        raise ConfigError(f"pruning method {method!r} gave scores that are not finite (NaN or infinite)")
    return ordered


def prune(given: ScoreInput) -> Mask:
    """The mask of ``given.cfg.prune_method`` at ``given.cfg.sparsity``: its scores, then ``threshold``
    (scope, structure). With N rounds (``rounds``), round k keeps density^(k/N) and scores a copy of the
    model with the previous round's mask applied; the model itself is never changed."""
    cfg = given.cfg
    if cfg.sparsity == 0.0:
        return Mask.ones(given.model, given.names)
    n = rounds(cfg)
    mask: Mask | None = None
    for k in range(1, n + 1):
        model = given.model
        if mask is not None:
            model = copy.deepcopy(given.model)
            mask.apply_to_params(model)
        this = dataclasses.replace(given, model=model, round=k)
        scores = _checked(cfg.prune_method, PRUNING[cfg.prune_method](this), this)
        if mask is not None:  # what an earlier round pruned stays pruned
            scores = {name: s.double().masked_fill(~mask[name].to(s.device), -math.inf) for name, s in scores.items()}
        sparsity = cfg.sparsity if k == n else 1.0 - (1.0 - cfg.sparsity) ** (k / n)
        if cfg.prune_structure and k < n:  # an early round keeps at most what the structure allows
            keep_n, of_m = parse_structure(cfg.prune_structure)
            sparsity = max(sparsity, 1.0 - keep_n / of_m)
        mask = threshold(scores, sparsity, cfg.prune_scope, cfg.prune_structure)
    assert mask is not None
    return mask


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
