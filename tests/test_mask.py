import math

import pytest
import torch
from torch import nn

from hvd_sparse.mask import Mask


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def half_mask(model):
    return Mask({n: torch.arange(p.numel()).reshape(p.shape) % 2 == 0 for n, p in model.named_parameters()})


def test_counts_density_and_equality():
    model = tiny()
    mask = half_mask(model)
    assert mask.num_total == 4 * 3 + 3 + 3 * 2 + 2
    assert mask.num_kept == sum(math.ceil(p.numel() / 2) for p in model.parameters())
    assert mask.density == pytest.approx(mask.num_kept / mask.num_total)
    assert mask == half_mask(model) and mask != Mask.ones(model, list(mask))


def test_checksum_is_stable_and_sensitive_to_one_bit():
    model = tiny()
    mask = half_mask(model)
    assert mask.sha256() == half_mask(model).sha256()
    flipped = {n: t.clone() for n, t in mask.items()}
    flipped["2.bias"][1] = ~flipped["2.bias"][1]
    assert Mask(flipped).sha256() != mask.sha256()


def test_flat_round_trip():
    model = tiny()
    mask = half_mask(model)
    flat = mask.to_flat()
    assert flat.dtype == torch.uint8 and flat.numel() == mask.num_total
    assert Mask.ones(model, list(mask)).from_flat(flat) == mask
    with pytest.raises(ValueError):
        mask.from_flat(flat[:-1])


def test_application_zeroes_exactly_the_pruned_entries():
    model = tiny()
    mask = half_mask(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.grad = torch.full_like(p, -3.0)
    mask.apply_to_params(model)
    mask.apply_to_grads(model)
    for name, p in model.named_parameters():
        keep = mask[name]
        assert torch.all(p[~keep] == 0) and torch.equal(p[keep], before[name][keep])
        assert torch.all(p.grad[~keep] == 0) and torch.all(p.grad[keep] == -3.0)


def test_non_bool_tensors_are_refused():
    with pytest.raises(TypeError):
        Mask({"w": torch.ones(3)})


def test_layer_density_and_bits_round_trip():
    model = tiny()
    mask = half_mask(model)
    density = mask.layer_density()
    assert list(density) == [n for n, _ in model.named_parameters()]
    assert density["0.weight"] == 0.5 and density["2.bias"] == 0.5 and density["0.bias"] == pytest.approx(2 / 3)
    shapes = {n: tuple(t.shape) for n, t in mask.items()}
    back = Mask.from_bits(mask.bits(), shapes)
    assert back == mask and back.sha256() == mask.sha256()
