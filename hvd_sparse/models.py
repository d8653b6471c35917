"""Model registry and the reference initialization (variance scaling, fan-in; zero biases)."""
from __future__ import annotations

import math
import sys
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

from hvd_sparse.registry import Registry


class _TwoConvTrunk(nn.Module):
    """Two blocks of 5x5 VALID conv + ReLU + 2x2 max-pool: the trunk of Simple-CNN and LeNet-5."""

    def __init__(self, input_shape: tuple[int, ...], channels: tuple[int, int], name: str):
        super().__init__()
        c, h, w = input_shape
        self.conv1 = nn.Conv2d(c, channels[0], 5)
        self.conv2 = nn.Conv2d(channels[0], channels[1], 5)
        h, w = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
        if h < 1 or w < 1:
            raise ValueError(f"{name} needs inputs of at least 12x12, got {input_shape}")
        self.num_features = channels[1] * h * w

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return torch.flatten(x, 1)


class SimpleCNN(_TwoConvTrunk):
    """The paper's Simple-CNN: two 5x5 VALID convs (32, 64) with ReLU and 2x2 max-pool, one FC.

    62,346 parameters on 28x28x1 inputs (832 + 51,264 + 10,250); no hidden FC layer.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int):
        super().__init__(input_shape, (32, 64), "simple-cnn")
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class MLP(nn.Module):
    """A fully connected ReLU network; LeNet-300-100 is MLP(hidden=(300, 100))."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...]):
        super().__init__()
        sizes = [math.prod(input_shape), *hidden, num_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class LeNet5(_TwoConvTrunk):
    """LeNet-5-Caffe as in the SNIP paper: conv 5x5x20, pool, conv 5x5x50, pool, FC 500, FC 10.

    431,080 parameters on 28x28x1 inputs (520 + 25,050 + 400,500 + 5,010).
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int):
        super().__init__(input_shape, (20, 50), "lenet5")
        self.fc1 = nn.Linear(self.num_features, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(self.features(x))))


class SameConv2d(nn.Conv2d):
    """A 3x3 convolution with TensorFlow's SAME padding (asymmetric when the stride is 2)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__(in_channels, out_channels, 3, stride=stride, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size in (x.shape[-1], x.shape[-2]):  # F.pad wants (left, right, top, bottom)
            out = math.ceil(size / self.stride[0])
            total = max((out - 1) * self.stride[0] + 3 - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


class PreActBlock(nn.Module):
    """r = relu(x); y = conv2(relu(conv1(r))); out = y + shortcut.

    The shortcut is x when the channels match, else avg-pool(r, stride) with zero channels appended.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = SameConv2d(in_channels, out_channels, stride)
        self.conv2 = SameConv2d(out_channels, out_channels)
        self.stride, self.extra = stride, out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = F.relu(x)
        y = self.conv2(F.relu(self.conv1(r)))
        if self.extra == 0 and self.stride == 1:
            return y + x
        shortcut = F.avg_pool2d(r, self.stride) if self.stride > 1 else r
        return y + F.pad(shortcut, (0, 0, 0, 0, 0, self.extra))


class ResNet8(nn.Module):
    """The paper's ResNet-8 without batch norm: 75,050 parameters on 32x32x3 inputs."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        self.stem = SameConv2d(input_shape[0], 16)
        self.blocks = nn.Sequential(PreActBlock(16, 16, 1), PreActBlock(16, 32, 2), PreActBlock(32, 64, 2))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.blocks(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


ModelFactory = Callable[[tuple[int, ...], int], nn.Module]

MODELS: Registry[ModelFactory] = Registry("model")  # plug-ins add theirs with hvd_sparse.register_model
for _name, _factory in {
    "simple-cnn": SimpleCNN,
    "resnet8": ResNet8,
    "lenet5": LeNet5,
    "lenet-300-100": lambda shape, k: MLP(shape, k, hidden=(300, 100)),
    "mlp-tiny": lambda shape, k: MLP(shape, k, hidden=(32,)),
}.items():
    MODELS.register(_name)(_factory)


def get_factory(name: str) -> ModelFactory:
    return MODELS[name]


# TF's variance_scaling truncates at two standard deviations; this corrects the std for that cut.
_TRUNCATED_STD = 0.87962566103423978


def variance_scaling_(weight: torch.Tensor, generator: torch.Generator, scale: float = 1.0) -> None:
    """TF's variance_scaling_initializer(scale, 'fan_in', 'truncated_normal')."""
    fan_in = weight[0].numel()
    std = math.sqrt(scale / fan_in) / _TRUNCATED_STD
    nn.init.trunc_normal_(weight, 0.0, std, -2 * std, 2 * std, generator=generator)


REFERENCE_INIT = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # the layers the reference initializes


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """The named model with the reference initialization, identical for the same seed on any rank: the
    weights of convolutions and linear layers variance-scaled (in parameter order, from ``seed``), their
    biases zero; every other parameter (a BatchNorm scale, an embedding) as the model made it. A model
    with ``reference_init = False`` keeps its own initialization entirely."""
    model = get_factory(name)(input_shape, num_classes)
    if not getattr(model, "reference_init", True):
        return model
    owner = {id(p): type(m) for m in model.modules() for p in m.parameters(recurse=False)}
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if not issubclass(owner[id(p)], REFERENCE_INIT):
                continue
            if pname.endswith("bias"):
                p.zero_()
            else:
                variance_scaling_(p, generator)
    return model


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets)


def cross_entropy_sum(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="sum")


Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def loss_for(name: str) -> Loss:
    """The mean loss over a batch that model ``name`` is trained and measured with: ``loss(outputs,
    targets)`` where the module that registered its factory defines one, else cross-entropy. The sums
    the toolkit needs (evaluation, the Lipschitz probe) are this mean times the batch's size."""
    module = sys.modules.get(MODELS.origin(name))
    declared = getattr(module, "loss", None) if module is not sys.modules[__name__] else None
    return declared if callable(declared) else cross_entropy


def summed(loss: Loss) -> Loss:
    """The sum over a batch of a mean loss (cross-entropy's own sum for cross-entropy: the same bits as ever)."""
    if loss is cross_entropy:
        return cross_entropy_sum
    return lambda outputs, targets: loss(outputs, targets) * len(targets)


NORMALIZATION = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)  # their scales and shifts are never pruned


def prunable_names(model: nn.Module, prune_biases: bool) -> list[str]:
    """Parameters a pruning method may prune: every weight, and the biases when asked (the reference
    does), but never a normalization layer's scale or shift (pruning one would silence a channel)."""
    norms = {id(p) for m in model.modules() if isinstance(m, NORMALIZATION) for p in m.parameters(recurse=False)}
    return [n for n, p in model.named_parameters() if (prune_biases or not n.endswith("bias")) and id(p) not in norms]
