"""An example plug-in: every torchvision classification model, by name, as ``tv-<name>``.

    horovodrun -np 2 python -m hvd_sparse.train --plugin examples/torchvision_models.py \
        --model tv-resnet18 --dataset synthetic-cifar --sparsity 0.9 --batch-size 64 --max-steps 100

The models keep torchvision's own initialization (``reference_init = False``); their BatchNorm layers
normalize by the statistics of the whole global batch at any world size (the toolkit synchronizes
them). Grayscale inputs are repeated to the three channels these models expect. Models built for a
fixed input size (Inception v3, the vision transformers) need inputs of that size.
"""
from __future__ import annotations

import torch
import torchvision
from torch import nn

import hvd_sparse


class ThreeChannels(nn.Module):
    """A torchvision model behind a view that repeats a single input channel three times."""

    reference_init = False  # keep torchvision's initialization

    def __init__(self, net: nn.Module, channels: int):
        super().__init__()
        self.net, self.repeat = net, 3 if channels == 1 else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.expand(-1, 3, -1, -1) if self.repeat == 3 else x)


def factory(name: str):
    def build(input_shape, num_classes):
        if input_shape[0] not in (1, 3):
            raise ValueError(f"tv-{name} takes images of 1 or 3 channels, got {input_shape}")
        return ThreeChannels(torchvision.models.get_model(name, weights=None, num_classes=num_classes), input_shape[0])

    return build


for _name in torchvision.models.list_models(module=torchvision.models):
    hvd_sparse.register_model(f"tv-{_name}")(factory(_name))
