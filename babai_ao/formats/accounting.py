"""Bits-per-weight accounting: every stored byte of a quantized layer over its weight count."""

from __future__ import annotations

import torch


def stored_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of all stored tensors (codes, scales, zeros, outliers, codebooks, indices)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def bits_per_weight(tensors: dict[str, torch.Tensor], out_features: int,
                    in_features: int) -> float:
    """``8 · stored bytes / (N · K)``."""
    return 8 * stored_bytes(tensors) / (out_features * in_features)


class StoredLayer:
    """Mixin for a stored layer format: ``tensors()`` is everything the file carries."""

    out_features: int
    in_features: int

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return stored_bytes(self.tensors())

    @property
    def bits_per_weight(self) -> float:
        return bits_per_weight(self.tensors(), self.out_features, self.in_features)
