import math

import pytest
import torch

from hvd_sparse.models import MODELS, build_model, get_factory, prunable_names


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_simple_cnn_has_the_papers_parameter_count():
    # conv 5x5x1x32 + 32, conv 5x5x32x64 + 64, fc 1024x10 + 10  (the paper)
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


def test_convolutions_are_variance_scaled_by_their_fan_in():
    """The reference scales a convolution's weights by its fan-in, in_channels x kernel height x kernel width
    (Simple-CNN's conv1: 1 x 5 x 5 = 25, conv2: 32 x 5 x 5 = 800), not by its input channels alone."""
    model = build_model("simple-cnn", (1, 28, 28), 10, seed=1)
    for conv, fan_in in ((model.conv1, 25), (model.conv2, 800)):
        assert conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] == fan_in
        weight = conv.weight.detach()
        assert abs(weight.std().item() / math.sqrt(1.0 / fan_in) - 1) < 0.05  # variance scaling, scale 1
        assert weight.abs().max().item() <= 2 * math.sqrt(1.0 / fan_in) / 0.87962566103423978 + 1e-6
        assert abs(weight.mean().item()) < 4 * math.sqrt(1.0 / fan_in) / math.sqrt(weight.numel())  # 4 standard errors
        assert torch.count_nonzero(conv.bias) == 0
    assert not torch.equal(model.conv2.weight, build_model("simple-cnn", (1, 28, 28), 10, seed=2).conv2.weight)


def test_prunable_names_follow_the_bias_option():
    model = build_model("simple-cnn", (1, 28, 28), 10, seed=0)
    assert prunable_names(model, True) == [n for n, _ in model.named_parameters()]
    assert prunable_names(model, False) == ["conv1.weight", "conv2.weight", "fc.weight"]


def test_resnet8_parameter_count_by_hand():
    stem = 3 * 16 * 9 + 16  # 448
    stage1 = 2 * (16 * 16 * 9 + 16)  # 4,640
    stage2 = (16 * 32 * 9 + 32) + (32 * 32 * 9 + 32)  # 13,888
    stage3 = (32 * 64 * 9 + 64) + (64 * 64 * 9 + 64)  # 55,424
    fc = 64 * 10 + 10  # 650
    assert count(build_model("resnet8", (3, 32, 32), 10, seed=0)) == stem + stage1 + stage2 + stage3 + fc == 75_050


def test_lenet5_caffe_parameter_count():
    # conv 5x5x1x20 + 20, conv 5x5x20x50 + 50, fc 800x500 + 500, fc 500x10 + 10
    assert count(build_model("lenet5", (1, 28, 28), 10, seed=0)) == 520 + 25_050 + 400_500 + 5_010 == 431_080


@pytest.mark.parametrize("name, shape", [
    ("simple-cnn", (1, 28, 28)), ("resnet8", (3, 32, 32)), ("lenet5", (1, 28, 28)),
    ("lenet-300-100", (1, 28, 28)), ("mlp-tiny", (1, 16, 16)), ("simple-cnn", (1, 16, 16)),
])
def test_every_model_maps_a_batch_to_logits_and_trains(name, shape):
    model = build_model(name, shape, 10, seed=0)
    x, y = torch.randn(4, *shape), torch.tensor([0, 1, 2, 3])
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert model(x).shape == (4, 10)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_stride_two_convolution_pads_like_tensorflow_same():
    from hvd_sparse.models import SameConv2d

    conv = SameConv2d(1, 1, stride=2)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0, 0] = 1.0  # the kernel's top-left tap
        conv.bias.zero_()
    x = torch.arange(1.0, 1.0 + 32 * 32).reshape(1, 1, 32, 32)
    y = conv(x)
    assert y.shape == (1, 1, 16, 16)
    # TF SAME pads 0 before and 1 after for 32 -> 16, so the top-left tap sees x[2i, 2j]
    assert torch.equal(y[0, 0], x[0, 0, ::2, ::2])


def test_resnet_block_shortcut_is_avg_pool_with_zero_channels():
    from hvd_sparse.models import PreActBlock

    block = PreActBlock(16, 32, stride=2)
    with torch.no_grad():
        for p in block.parameters():
            p.zero_()  # residual branch outputs 0, leaving the shortcut
    x = torch.randn(2, 16, 8, 8)
    out = block(x)
    expected = torch.nn.functional.avg_pool2d(torch.relu(x), 2)
    assert torch.allclose(out[:, :16], expected) and torch.count_nonzero(out[:, 16:]) == 0
    same = PreActBlock(16, 16, stride=1)
    with torch.no_grad():
        for p in same.parameters():
            p.zero_()
    assert torch.equal(same(x), x)  # identity shortcut takes x itself, not relu(x)
