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


# -- the other methods, each against its paper's formula written out independently ----------------


from hvd_sparse.config import PruneConfig  # noqa: E402
from hvd_sparse.models import cross_entropy  # noqa: E402
from hvd_sparse.pruning import ScoreInput, nm_eligible, prune, threshold  # noqa: E402


def tiny(seed=0, dtype=torch.float64):
    """mlp-tiny (16 -> hidden -> 3) with random biases, in float64 so that formulas agree to 1e-6."""
    model = build_model("mlp-tiny", (1, 4, 4), 3, seed=seed).to(dtype)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(generator=torch.Generator().manual_seed(seed + 1))
    return model


def given(model, method, sparsity=0.8, split=None, **cfg):
    split = split or Split(data().x.double(), data().y)
    prune_cfg = PruneConfig(sparsity=sparsity, prune_method=method, snip_batch_size=20, **cfg)
    return ScoreInput(model, prunable_names(model, True), split, cross_entropy, prune_cfg, seed=5)


def flat_forward(model, names, flat, x):
    shapes = [p.shape for p in model.parameters()]
    w = dict(zip(names, torch.split(flat, [s.numel() for s in shapes])))
    w = {n: v.reshape(s) for (n, v), s in zip(w.items(), shapes)}
    h = F.relu(F.linear(torch.flatten(x, 1), w["layers.0.weight"], w["layers.0.bias"]))
    return F.linear(h, w["layers.1.weight"], w["layers.1.bias"])


def test_grasp_is_minus_w_times_the_hessian_gradient_product_with_the_highest_removed():
    from hvd_sparse.pruning import grasp_score

    model = tiny()
    g_in = given(model, "grasp")
    names = g_in.names
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    batches = list(snip_batches(g_in.train, 20, 0, seed=5))
    loss = lambda w: sum(F.cross_entropy(flat_forward(model, names, w, x) / 200.0, y) for x, y in batches)  # noqa: E731
    g = torch.autograd.functional.jacobian(loss, flat)
    hessian = torch.autograd.functional.hessian(loss, flat)
    removal = -flat * (hessian @ g)  # GraSP's score: the highest are removed
    removal = removal / removal.abs().sum()
    ours = torch.cat([s.reshape(-1) for s in grasp_score(g_in).values()])
    torch.testing.assert_close(ours, -removal, rtol=1e-6, atol=1e-12)
    k = round(flat.numel() * 0.2)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.argsort(removal, stable=True)[:k]] = True  # the lowest removal scores stay
    assert torch.equal(prune(g_in).to_flat().bool(), keep)


def synflow_closed_form(model, keep=None):
    """|W2| (|W1| 1 + |b1|) + |b2| summed: dR/dW1[i, j] = sum_k |W2[k, i]|, dR/dW2[k, i] = h_i, biases alike."""
    p = {n: v.detach().abs() * (keep[n] if keep else 1) for n, v in model.named_parameters()}
    column = p["layers.1.weight"].sum(dim=0)
    h = p["layers.0.weight"].sum(dim=1) + p["layers.0.bias"]
    return {"layers.0.weight": p["layers.0.weight"] * column[:, None], "layers.0.bias": p["layers.0.bias"] * column,
            "layers.1.weight": p["layers.1.weight"] * h[None, :], "layers.1.bias": p["layers.1.bias"]}


def test_synflow_one_round_is_its_closed_form_and_does_not_read_the_data():
    from hvd_sparse.pruning import synflow_score

    model = tiny()
    scores = synflow_score(given(model, "synflow"))
    for name, expected in synflow_closed_form(model).items():
        torch.testing.assert_close(scores[name], expected, rtol=1e-6, atol=0)
    other = Split(torch.randn(60, 1, 4, 4, dtype=torch.float64) * 7, torch.randint(0, 3, (60,)))
    assert torch.equal(prune(given(model, "synflow", split=other)).to_flat(), prune(given(model, "synflow")).to_flat())


def test_synflow_rounds_follow_the_exponential_schedule_with_the_mask_applied_between_them():
    model = tiny()
    rounds, sparsity = 5, 0.9
    keep = None
    for k in range(1, rounds + 1):  # restated: round k keeps density^(k/N) of the closed-form scores
        scores = synflow_closed_form(model, keep)
        if keep:
            scores = {n: s.masked_fill(~keep[n], -1.0) for n, s in scores.items()}
        keep = dict(threshold(scores, 1 - 0.1 ** (k / rounds)).items())
    mask = prune(given(model, "synflow", sparsity=sparsity, prune_iterations=rounds))
    assert all(torch.equal(mask[n], keep[n]) for n in keep)
    assert mask.num_kept == round(mask.num_total * 0.1)
    assert prune(given(model, "synflow", sparsity=sparsity)).num_kept == mask.num_kept  # 100 rounds by default


def test_magnitude_keeps_the_largest_weights_and_random_is_its_seeds():
    model = tiny()
    mask = prune(given(model, "magnitude", sparsity=0.5))
    flat = torch.cat([p.detach().abs().reshape(-1) for p in model.parameters()])
    assert torch.equal(mask.to_flat().bool(), flat >= flat.sort(descending=True).values[mask.num_kept - 1])
    a, b = prune(given(model, "random")), prune(given(model, "random"))
    other = prune(dataclasses_replace(given(model, "random"), seed=6))
    assert torch.equal(a.to_flat(), b.to_flat()) and not torch.equal(a.to_flat(), other.to_flat())
    layerwise = prune(given(model, "random", sparsity=0.75, prune_scope="layerwise"))
    for name, keep in layerwise.items():
        assert int(keep.sum()) == max(1, round(keep.numel() * 0.25)), name


def dataclasses_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


def test_n_m_keeps_at_most_n_of_every_m_consecutive_inputs_of_each_output():
    model = build_model("simple-cnn", (1, 28, 28), 10, seed=0)  # conv1 rows: 25 inputs (a partial last group)
    split = Split(torch.randn(40, 1, 28, 28), torch.randint(0, 10, (40,)))
    names = prunable_names(model, False)
    for method in ("snip", "magnitude"):
        cfg = PruneConfig(sparsity=0.6, prune_method=method, prune_structure="2:4", snip_batch_size=20)
        mask = prune(ScoreInput(model, names, split, cross_entropy, cfg, seed=0))
        assert mask.num_kept == round(mask.num_total * 0.4)
        for name, keep in mask.items():
            rows = keep.reshape(keep.shape[0], -1)
            pad = (-rows.shape[1]) % 4
            groups = torch.cat([rows, torch.zeros(rows.shape[0], pad, dtype=torch.bool)], 1).reshape(rows.shape[0], -1, 4)
            assert int(groups.sum(dim=2).max()) <= 2, name
    cfg = PruneConfig(sparsity=0.5, prune_method="magnitude", prune_structure="2:4", prune_scope="layerwise")
    fc = prune(ScoreInput(model, names, split, cross_entropy, cfg, seed=0))["fc.weight"].reshape(10, -1, 4)
    assert torch.equal(fc.sum(dim=2), torch.full(fc.shape[:2], 2))  # 1024 inputs a row: exactly 2 of every 4


def test_n_m_eligibility_ties_by_position_and_too_sparse_a_structure_is_refused():
    score = torch.tensor([[1.0, 1.0, 1.0, 1.0, 5.0, 0.0]])
    assert nm_eligible(score, 2, 4).tolist() == [[True, True, False, False, True, True]]
    assert nm_eligible(torch.tensor([3.0, 1.0]), 1, 4).tolist() == [True, True]  # a bias is not structured
    with pytest.raises(ConfigError, match="--prune-structure 1:4 keeps at most 1/4 of the weights: --sparsity must be at least 0.75"):
        PruneConfig(sparsity=0.5, prune_structure="1:4")
    with pytest.raises(ConfigError, match="must be N:M with 0 < N < M"):
        PruneConfig(sparsity=0.5, prune_structure="4:2")
    with pytest.raises(ConfigError, match=r"allows 3 of the 6 prunable weights, fewer than the 5"):
        threshold({"w": torch.rand(1, 4), "v": torch.rand(1, 2)}, 1 / 6, structure="1:2")


def test_layerwise_scope_keeps_each_tensors_density_and_ties_by_position():
    scores = {"a": torch.ones(10), "b": torch.arange(20.0)}
    mask = threshold(scores, 0.7, scope="layerwise")
    assert mask["a"].tolist() == [True] * 3 + [False] * 7  # ties: the first positions
    assert mask["b"].nonzero().reshape(-1).tolist() == [14, 15, 16, 17, 18, 19]


@pytest.mark.launches
def test_every_rank_holds_rank_0s_mask_on_both_engines(tmp_path):
    """np=1, np=2 on Horovod and np=2 on torch.distributed: the same mask (rank 0 scores, every rank checks
    the checksum of what it received; any method goes through the same broadcast); 2:4 holds in the logged mask."""
    method, extra = "synflow", ["--prune-structure", "2:4", "--prune-scope", "layerwise"]
    from hvd_sparse.log import read_log
    from conftest import describe, mpirun, run_train, torchrun

    flags = ["--dataset", "synthetic", "--model", "simple-cnn", "--sparsity", "0.5", "--prune-method", method,
             "--snip-batches", "2", "--batch-size", "32", "--max-steps", "1", "--eval-every", "1", *extra]
    masks = {}
    for name, np_, launcher in (("one", 1, mpirun), ("horovod", 2, mpirun), ("torch", 2, torchrun)):
        proc = run_train(np_, *flags, "--out", str(tmp_path / name), launcher=launcher)
        assert proc.returncode == 0, describe(proc)
        (log,) = (tmp_path / name).glob("*.h5")
        masks[name] = read_log(log)
        assert masks[name].config["prune"]["prune_method"] == method
    assert len({m.attrs["mask_sha256"] for m in masks.values()}) == 1
    fc = masks["one"].mask["fc.weight"]
    assert int(fc.reshape(fc.shape[0], -1, 4).sum(dim=2).max()) <= 2


def test_rounds_with_a_structure_keep_what_it_allows_until_the_last():
    model = build_model("simple-cnn", (1, 28, 28), 10, seed=0)
    split = Split(torch.randn(40, 1, 28, 28), torch.randint(0, 10, (40,)))
    cfg = PruneConfig(sparsity=0.8, prune_method="magnitude", prune_structure="2:4", prune_iterations=3)
    mask = prune(ScoreInput(model, prunable_names(model, False), split, cross_entropy, cfg, seed=0))
    assert mask.num_kept == round(mask.num_total * 0.2)
    fc = mask["fc.weight"].reshape(10, -1, 4)
    assert int(fc.sum(dim=2).max()) <= 2


def test_a_resumed_mask_keeps_the_parameters_it_names():
    """A mask from an older version may name other parameters (0.4.0 pruned BatchNorm scales): a resume
    takes the checkpoint's names, not today's rule."""
    from hvd_sparse import dist
    from hvd_sparse.config import Config
    from hvd_sparse.data import Datasets
    from hvd_sparse.engine import prepare_mask
    from hvd_sparse.mask import Mask

    dist.init()
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Flatten(), torch.nn.Linear(8, 3))
    known = Mask({"0.weight": torch.ones(2, 1, 3, 3, dtype=torch.bool), "1.weight": torch.tensor([True, False])})
    split = data()
    cfg = Config.from_dict({"prune": {"sparsity": 0.1}})
    got = prepare_mask(cfg, model, Datasets(split, split, None, 3), known)
    assert list(got) == ["0.weight", "1.weight"] and got.sha256() == known.sha256()
    fresh = prepare_mask(cfg, model, Datasets(split, split, None, 3), None)
    assert list(fresh) == ["0.weight", "0.bias", "3.weight", "3.bias"]  # today's rule: never a normalization layer
