"""Quantized linears as plain-buffer modules for ``torch.export``.

``BabaiQuantizedTensor`` weights (torchao subclass) cannot be fakified by ``torch.export``
on torch 2.13 (``set the storage … on device "meta"``), so before exporting, every
``nn.Linear`` holding one is swapped for a :class:`BufferLinear` that keeps the same packed
tensors as buffers and calls the same ``torch.ops.babai.linear``, and every quantized
``nn.Embedding`` (``babai_ao.ao.embedding``) for a :class:`BufferEmbedding` calling
``torch.ops.babai.embedding`` — the exported graph is the one the subclass would give.
A table tied to an ``lm_head`` gives both modules the very same buffer tensors.
:func:`plain_buffers` swaps and restores.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

import babai_ao.ao.ops  # noqa: F401  (registers babai::linear, babai::embedding)

_OPTIONAL = ("outlier_ptr", "outlier_idx", "outlier_val")


def _plain(t: torch.Tensor | None, memo: dict[int, torch.Tensor] | None = None
           ) -> torch.Tensor | None:
    """``t`` detached and contiguous (dim order [0, 1] for .pte); one result per tensor."""
    if t is None:
        return None
    if memo is None:
        return t.detach().contiguous()
    if id(t) not in memo:
        memo[id(t)] = t.detach().contiguous()
    return memo[id(t)]


class BufferLinear(torch.nn.Module):
    """``x @ Wᵀ + b`` through ``babai::linear`` with the packed weight held as buffers."""

    def __init__(self, weight, bias: torch.Tensor | None,
                 memo: dict[int, torch.Tensor] | None = None):
        super().__init__()
        self.bits, self.group_size = int(weight.bits), int(weight.group_size)
        self.in_features = int(weight.shape[1])

        def plain(t: torch.Tensor | None) -> torch.Tensor | None:
            return _plain(t, memo)

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


class BufferEmbedding(torch.nn.Module):
    """``table[indices]`` through ``babai::embedding`` with the packed table held as buffers."""

    def __init__(self, weight, memo: dict[int, torch.Tensor] | None = None):
        super().__init__()
        self.bits, self.group_size = int(weight.bits), int(weight.group_size)
        self.embedding_dim = int(weight.shape[1])
        self.dtype = weight.dtype
        if weight.outlier_ptr is not None or weight.transposed:
            from babai_ao.errors import BabaiError

            raise BabaiError("quantized embeddings with outliers (or transposed) cannot be "
                             "exported: quantize them with babai_ao.quantize_embeddings_")
        self.register_buffer("packed", _plain(weight.qdata, memo))
        self.register_buffer("scales", _plain(weight.scale, memo))
        self.register_buffer("zeros", _plain(weight.zero_point, memo))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.ops.babai.embedding(indices, self.packed, self.scales, self.zeros,
                                         self.bits, self.group_size, self.embedding_dim,
                                         self.dtype)


def _quantized_weight(module: torch.nn.Module) -> bool:
    return type(getattr(module, "weight", None)).__name__ == "BabaiQuantizedTensor"


def _is_quantized(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) and _quantized_weight(module)


@contextmanager
def plain_buffers(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block, ``model``'s quantized ``nn.Linear``s are ``BufferLinear``s and its
    quantized ``nn.Embedding``s ``BufferEmbedding``s."""
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
    memo: dict[int, torch.Tensor] = {}  # tied weights: the same buffer tensors in both
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _is_quantized(child):
                if child.weight.transposed:
                    continue  # F.linear refuses it too; leave the error to the model
                setattr(parent, name, BufferLinear(child.weight, child.bias, memo))
                swapped.append((parent, name, child))
            elif isinstance(child, torch.nn.Embedding) and _quantized_weight(child):
                setattr(parent, name, BufferEmbedding(child.weight, memo))
                swapped.append((parent, name, child))
    try:
        yield model
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
