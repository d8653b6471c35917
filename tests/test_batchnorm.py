"""SyncedBatchNorm: at one rank the arithmetic of torch's BatchNorm; the same parameters, buffers and
state_dict keys; normalization layers are never pruned. (Across real ranks: tests/test_examples.py.)"""
import copy

import pytest
import torch
from torch import nn

from hvd_sparse.batchnorm import SyncedBatchNorm, batch_statistics, synced
from hvd_sparse.models import prunable_names


def normed_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Sequential(nn.Linear(4 * 10 * 10, 3), nn.BatchNorm1d(3, momentum=None)))
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.normal_()
    return net


def test_at_one_rank_it_trains_as_torchs_batchnorm():
    plain = normed_net()
    ours = synced(copy.deepcopy(plain))
    assert [type(m) for m in (ours[1], ours[4][1])] == [SyncedBatchNorm, SyncedBatchNorm]
    assert ours.state_dict().keys() == plain.state_dict().keys()
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        x, y = torch.randn(16, 1, 12, 12, generator=g), torch.randint(0, 3, (16,), generator=g)
        for net in (plain, ours):
            net.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
        for (name, a), b in zip(plain.named_parameters(), ours.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)
    for (name, a), b in zip(plain.named_buffers(), ours.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)  # momentum None: cumulative
    plain.eval(), ours.eval()
    torch.testing.assert_close(ours(x), plain(x))


def test_the_replacement_holds_the_very_same_tensors_and_mode():
    net = normed_net().eval()
    weight, running = net[1].weight, net[1].running_mean
    synced(net)
    assert net[1].weight is weight and net[1].running_mean is running and not net[1].training
    assert batch_statistics(net) == ["1", "4.1"]
    assert synced(nn.Linear(2, 2)).__class__ is nn.Linear


def test_bf16_autocast_keeps_the_statistics_in_float32():
    net = synced(normed_net())
    x = torch.randn(8, 1, 12, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        net[1](torch.randn(4))


def test_normalization_layers_are_never_pruned():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.GroupNorm(1, 2), nn.Flatten(), nn.LayerNorm(8))
    assert prunable_names(net, prune_biases=True) == ["0.weight", "0.bias"]
    assert prunable_names(net, prune_biases=False) == ["0.weight"]
