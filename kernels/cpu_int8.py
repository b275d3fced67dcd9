"""8-bit per-row CPU path: torch's ``_weight_int8pack_mm`` (``x @ (w8·s)ᵀ``, int8 ``w8``).

A ``BabaiQuantizedTensor`` with 8-bit codes, one group per row (``group_size = K``) and every
``q − z`` inside int8 is exactly ``W = s_n · w8`` with ``w8 = q − z``: the compute form HPTQ
decodes to (zero 128, codes clamped to int8, the rest in CSR — layers without CSR entries
qualify). Like the int4pack kernel it is fast only for bf16 activations (fp32 takes a
scalar path, ~6× slower than fp32 ``mm``, measured), so ``Int8PackLinear`` computes in bf16.
"""

from __future__ import annotations

import torch
from torch import nn


class Int8PackLinear(nn.Module):
    """``y = x @ (s·w8)ᵀ + b`` with int8 ``w8`` [N, K] and one scale per row, in bf16."""

    @classmethod
    def eligible(cls, w) -> bool:
        if not (w.bits == 8 and w.group_size == w.in_features and w.outlier_ptr is None):
            return False
        centered = w.codes() - w.zero_points()
        return bool(centered.min() >= -128 and centered.max() <= 127)

    @classmethod
    def from_weight(cls, w, bias: torch.Tensor | None) -> Int8PackLinear:
        w8 = (w.codes() - w.zero_points()).to(torch.int8)
        return cls(w8, w.scale.reshape(-1), bias)

    def __init__(self, w8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("w8", w8.contiguous())
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.out_features, self.in_features = w8.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch._weight_int8pack_mm(x2, self.w8, self.scales)
        if self.bias is not None:
            y = y + self.bias.to(torch.bfloat16)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                "int8 per row (bf16 compute)")
