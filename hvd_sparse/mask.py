"""The one Mask type: boolean keep-tensors keyed by parameter name. All sparsity goes through it."""
from __future__ import annotations

import hashlib
import math
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn


def split_flat(flat: torch.Tensor, shapes: Sequence[torch.Size | tuple[int, ...]]) -> list[torch.Tensor]:
    """Consecutive views of the 1-D ``flat``, one per shape, in order (the inverse of concatenating
    flattened tensors); ValueError unless the sizes add up to ``flat.numel()`` exactly."""
    sizes = [math.prod(shape) for shape in shapes]
    if sum(sizes) != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} entries, expected {sum(sizes)}")
    return [part.view(shape) for part, shape in zip(flat.split(sizes), shapes)]


class Mask:
    """``True`` keeps a parameter entry, ``False`` prunes it (its value and gradient are held at 0)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        for name, t in tensors.items():
            if t.dtype != torch.bool:
                raise TypeError(f"mask for {name} must be bool, got {t.dtype}")
        self._tensors = dict(tensors)
        self._factors: dict[str, torch.Tensor] | None = None  # float 0/1 copies, built on first use

    @classmethod
    def ones(cls, model: nn.Module, names: list[str]) -> "Mask":
        params = dict(model.named_parameters())
        return cls({n: torch.ones_like(params[n], dtype=torch.bool) for n in names})

    # -- access ----------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self._tensors.items())

    @property
    def num_total(self) -> int:
        return sum(t.numel() for t in self._tensors.values())

    @property
    def num_kept(self) -> int:
        return sum(int(t.sum()) for t in self._tensors.values())

    @property
    def density(self) -> float:
        return self.num_kept / max(self.num_total, 1)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def layer_density(self) -> dict[str, float]:
        """Fraction kept in each tensor, in model order."""
        return {n: float(t.float().mean()) if t.numel() else 1.0 for n, t in self._tensors.items()}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mask) or list(self) != list(other):
            return False
        return all(torch.equal(self[n].cpu(), other[n].cpu()) for n in self)

    # -- identity and serialization --------------------------------------------------------
    def bits(self) -> dict[str, np.ndarray]:
        """name -> np.packbits of the flattened mask, 8 entries a byte (the shapes are stored apart)."""
        return {n: np.packbits(t.detach().cpu().numpy().ravel()) for n, t in self._tensors.items()}

    @classmethod
    def from_bits(cls, bits_of: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> "Mask":
        """Inverse of ``bits`` (e.g. a mask read back from an HDF5 log)."""
        out = {}
        for name, bits in bits_of.items():
            shape = tuple(shapes[name])
            flat = np.unpackbits(np.asarray(bits, dtype=np.uint8), count=int(np.prod(shape, dtype=np.int64)))
            out[name] = torch.from_numpy(flat.astype(bool).reshape(shape))
        return cls(out)

    def sha256(self) -> str:
        """Checksum over names, shapes and bits, in insertion (= model) order."""
        h = hashlib.sha256()
        for name, t in self._tensors.items():
            h.update(f"{name}:{tuple(t.shape)};".encode())
            h.update(np.packbits(t.detach().cpu().numpy().ravel()).tobytes())
        return h.hexdigest()

    def to_flat(self) -> torch.Tensor:
        """All entries as one uint8 vector, in model order (for a single broadcast)."""
        return torch.cat([t.detach().reshape(-1).to(torch.uint8) for t in self._tensors.values()])

    def from_flat(self, flat: torch.Tensor) -> "Mask":
        """A mask of this mask's names and shapes, filled from ``to_flat`` output."""
        parts = split_flat(flat, [t.shape for t in self._tensors.values()])
        return Mask({name: part.to(torch.bool) for name, part in zip(self._tensors, parts)})

    def by_parameter(self, model: nn.Module) -> list[torch.Tensor | None]:
        """Per trainable parameter of ``model`` (model order), its boolean mask, or None where nothing
        is pruned: the order in which gradients are gathered, normed and sent."""
        return [self._tensors.get(name) for name, p in model.named_parameters() if p.requires_grad]

    def to(self, device: torch.device | str) -> "Mask":
        return Mask({n: t.to(device) for n, t in self._tensors.items()})

    # -- application -------------------------------------------------------------------------
    def _pairs(self, model: nn.Module) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
        params = dict(model.named_parameters())
        missing = [n for n in self._tensors if n not in params]
        if missing:
            raise KeyError(f"mask names not in the model: {missing}")
        if self._factors is None:
            self._factors = {n: t.to(params[n].device, params[n].dtype) for n, t in self._tensors.items()}
        for name, factor in self._factors.items():
            yield params[name], factor

    # A multiply by a 0/1 float tensor, not masked_fill_: no branch per element, several times faster
    # on large tensors (BENCHMARKS.md, "Gradient allreduce"). Pruned entries become 0
    # (-0.0 where the value was negative, which compares equal to 0); NaN/inf stay non-finite,
    # which the training loop reports as INFEASIBLE anyway.
    @torch.no_grad()
    def apply_to_params(self, model: nn.Module) -> None:
        for p, factor in self._pairs(model):
            p.mul_(factor)

    @torch.no_grad()
    def apply_to_grads(self, model: nn.Module) -> None:
        for p, factor in self._pairs(model):
            if p.grad is not None:
                p.grad.mul_(factor)
