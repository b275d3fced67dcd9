"""Quantized linears as plain-buffer modules for ``torch.export``.

``BabaiQuantizedTensor`` weights (torchao subclass) cannot be fakified by ``torch.export``
on torch 2.13 (``set the storage … on device "meta"``), so before exporting, every
``nn.Linear`` holding one is swapped for a :class:`BufferLinear` that keeps the same packed
tensors as buffers and calls the same ``torch.ops.babai.linear`` — the exported graph is the
one the subclass would give. :func:`plain_buffers` swaps and restores.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

import babai_ao.ops  # noqa: F401  (registers babai::linear)

_OPTIONAL = ("outlier_ptr", "outlier_idx", "outlier_val")


class BufferLinear(torch.nn.Module):
    """``x @ Wᵀ + b`` through ``babai::linear`` with the packed weight held as buffers."""

    def __init__(self, weight, bias: torch.Tensor | None):
        super().__init__()
        self.bits, self.group_size = int(weight.bits), int(weight.group_size)
        self.in_features = int(weight.shape[1])
        def plain(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().contiguous()  # dim order [0, 1] for .pte

        self.register_buffer("packed", plain(weight.qdata))
        self.register_buffer("scales", plain(weight.scale))
        self.register_buffer("zeros", plain(weight.zero_point))
        self.register_buffer("bias", plain(bias))
        for name in _OPTIONAL:
            self.register_buffer(name, plain(getattr(weight, name, None)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.babai.linear(x, self.packed, self.scales, self.zeros, self.bias,
                                      self.bits, self.group_size, self.in_features,
                                      self.outlier_ptr, self.outlier_idx, self.outlier_val)


def _is_quantized(module: torch.nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return isinstance(module, torch.nn.Linear) and type(w).__name__ == "BabaiQuantizedTensor"


@contextmanager
def plain_buffers(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block, ``model``'s quantized ``nn.Linear``s are ``BufferLinear``s."""
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _is_quantized(child):
                if child.weight.transposed:
                    continue  # F.linear refuses it too; leave the error to the model
                setattr(parent, name, BufferLinear(child.weight, child.bias))
                swapped.append((parent, name, child))
    try:
        yield model
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
