import pytest
import torch
import torch.nn.functional as F

from hvd_sparse.data import Split
from hvd_sparse.models import build_model, prunable_names
from hvd_sparse.config import ConfigError
from hvd_sparse.pruning import kept_count, snip, snip_batches, snip_scores, top_k_mask


def data(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def reference_snip(model, split, batches, sparsity):
    """SNIP written out the slow, obvious way: a multiplicative mask c = 1, dL/dc, per-entry sort."""
    params = dict(model.named_parameters())
    c = {n: torch.ones_like(p, requires_grad=True) for n, p in params.items()}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for x, y in batches:
        h = torch.flatten(x, 1)
        h = F.relu(F.linear(h, params["layers.0.weight"] * c["layers.0.weight"], params["layers.0.bias"] * c["layers.0.bias"]))
        out = F.linear(h, params["layers.1.weight"] * c["layers.1.weight"], params["layers.1.bias"] * c["layers.1.bias"])
        grads = torch.autograd.grad(F.cross_entropy(out, y), list(c.values()))
        for n, g in zip(c, grads):
            total[n] += g
    entries = []  # (score, position) for every entry, in model order
    for n in params:
        for v in total[n].abs().reshape(-1).tolist():
            entries.append((v, len(entries)))
    denom = sum(v for v, _ in entries)
    k = round(len(entries) * (1 - sparsity))
    kept = {pos for _, pos in sorted(entries, key=lambda e: (-e[0], e[1]))[:k]}
    keep_flat = torch.tensor([i in kept for i in range(len(entries))])
    scores = {n: total[n].abs() / denom for n in params}
    return keep_flat, scores


@pytest.mark.parametrize("sparsity", [0.3, 0.75, 0.95])
def test_snip_matches_the_reference_computation(sparsity):
    model = build_model("mlp-tiny", (1, 4, 4), 3, seed=0)
    with torch.no_grad():  # non-zero biases so that they get real scores here
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(generator=torch.Generator().manual_seed(1))
    split = data()
    names = prunable_names(model, True)
    batches = list(snip_batches(split, batch_size=20, num_batches=0, seed=5))
    assert len(batches) == 3
    keep_ref, scores_ref = reference_snip(model, split, batches, sparsity)
    scores = snip_scores(model, names, batches)
    for n in names:
        torch.testing.assert_close(scores[n], scores_ref[n], rtol=1e-5, atol=1e-9)
    mask = snip(model, names, split, sparsity, batch_size=20, num_batches=0, seed=5)
    assert torch.equal(mask.to_flat().bool(), keep_ref)
    assert mask.num_kept == round(mask.num_total * (1 - sparsity))


def test_zero_initialized_biases_are_pruned_first():
    model = build_model("mlp-tiny", (1, 4, 4), 3, seed=0)
    mask = snip(model, prunable_names(model, True), data(), 0.5, batch_size=20)
    assert not mask["layers.0.bias"].any() and not mask["layers.1.bias"].any()
    without = snip(model, prunable_names(model, False), data(), 0.5, batch_size=20)
    assert "layers.0.bias" not in list(without)


def test_ties_are_broken_by_position():
    scores = {"a": torch.zeros(2, 3), "b": torch.tensor([0.0, 1.0, 0.0, 1.0])}
    mask = top_k_mask(scores, sparsity=0.5)  # k = 5: both 1.0s, then the first three zeros
    assert mask["a"].reshape(-1).tolist() == [True, True, True, False, False, False]
    assert mask["b"].tolist() == [False, True, False, True]


def test_sparsity_zero_keeps_everything_and_seed_changes_batches():
    model = build_model("mlp-tiny", (1, 4, 4), 3, seed=0)
    names = prunable_names(model, True)
    assert snip(model, names, data(), 0.0).density == 1.0
    a = snip_scores(model, names, snip_batches(data(), 10, 1, seed=0))
    b = snip_scores(model, names, snip_batches(data(), 10, 1, seed=0))
    c = snip_scores(model, names, snip_batches(data(), 10, 1, seed=1))
    assert all(torch.equal(a[n], b[n]) for n in names)
    assert not all(torch.equal(a[n], c[n]) for n in names)


def test_a_sparsity_that_keeps_no_weight_is_refused():
    assert kept_count(1000, 0.9) == 100 and kept_count(1000, 0.9994) == 1
    with pytest.raises(ConfigError, match="--sparsity 0.999999999 keeps none of the 1000 prunable weights"):
        kept_count(1000, 0.999999999)
    with pytest.raises(ConfigError, match="keeps none"):
        top_k_mask({"w": torch.rand(10)}, 0.96)
