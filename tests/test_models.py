import math

import pytest
import torch

from hvd_sparse.models import MODELS, build_model, get_factory, prunable_names


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_simple_cnn_has_the_papers_parameter_count():
    # conv 5x5x1x32 + 32, conv 5x5x32x64 + 64, fc 1024x10 + 10  (PAPER.md)
    assert count(build_model("simple-cnn", (1, 28, 28), 10, seed=0)) == 832 + 51_264 + 10_250 == 62_346


def test_lenet_300_100_parameter_count():
    assert count(build_model("lenet-300-100", (1, 28, 28), 10, seed=0)) == 784 * 300 + 300 + 300 * 100 + 100 + 1010


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(ValueError, match="valid: " + ", ".join(sorted(MODELS))):
        get_factory("resnet-1000")


def test_initialization_is_seeded_and_variance_scaled():
    a = build_model("lenet-300-100", (1, 28, 28), 10, seed=1)
    b = build_model("lenet-300-100", (1, 28, 28), 10, seed=1)
    c = build_model("lenet-300-100", (1, 28, 28), 10, seed=2)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb)
        if name.endswith("bias"):
            assert torch.count_nonzero(pa) == 0
        else:
            assert not torch.equal(pa, pc)
            fan_in = pa.shape[1]
            assert abs(pa.std().item() / math.sqrt(1.0 / fan_in) - 1) < 0.05  # variance scaling, scale 1
            assert pa.abs().max().item() <= 2 * math.sqrt(1.0 / fan_in) / 0.87962566103423978 + 1e-6


def test_prunable_names_follow_the_bias_option():
    model = build_model("simple-cnn", (1, 28, 28), 10, seed=0)
    assert prunable_names(model, True) == [n for n, _ in model.named_parameters()]
    assert prunable_names(model, False) == ["conv1.weight", "conv2.weight", "fc.weight"]
