"""4-bit CPU fast path: torch's ``_weight_int4pack_mm_for_cpu`` on a layout built once.

That kernel computes ``x @ Wᵀ`` with ``W[n, k] = (q[n, k] − 8)·a[g, n] + c[g, n]`` (``g =
k // group``) from its own nibble layout (``_convert_weight_to_int4pack_for_cpu``). Our
``W = s·(q − z)`` is the same affine map with ``a = s`` and ``c = s·(8 − z)``. It is only fast
for bf16 activations (measured: fp32 activations take a scalar path ~10× slower than fp32
``mm``), so it is used for bf16 inputs, 4-bit codes, groups of 32/64/128/256 and
``N % 16 == 0``; everything else takes the exact dequant + ``mm`` path of ``cpu.py``.

The layout costs 0.1–1 ms per layer to build, so it is built on a layer's first call and
kept in a cache keyed by the packed tensor (a weak reference, so a freed model frees its
entries; the tensors' version counters, so an in-place ``copy_`` rebuilds it). The cache
holds ≈ 4.5 extra bits per weight; ``clear_cache()`` drops it, ``BABAI_CPU_INT4PACK=0``
turns the path off.

``babai_ao.prepare_cpu(model)`` (``kernels/prepare.py``) goes one step further for CPU
inference: every eligible 4-bit linear becomes an ``Int4PackLinear`` holding only the
layout, whose forward is the aten call itself — no custom-op round trip per layer (~40 µs
each, measured), so a compiled graph calls the int4pack kernel directly.
"""

from __future__ import annotations

import os
import weakref

import torch
from torch import nn

GROUP_SIZES = (32, 64, 128, 256)
ENABLED = os.environ.get("BABAI_CPU_INT4PACK", "1") != "0"

_cache: dict[int, tuple] = {}
stats = {"built": 0, "hits": 0}


def supported(x_dtype: torch.dtype, bits: int, group_size: int, out_features: int) -> bool:
    """Whether ``babai::linear`` on CPU takes the int4pack kernel for these arguments."""
    return (ENABLED and bits == 4 and x_dtype == torch.bfloat16 and group_size in GROUP_SIZES
            and out_features % 16 == 0)


def build_layout(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(int4pack weight, bf16 ``[G, N, 2]`` of ``(s, s·(8 − z))``) from codes [N, K] and
    scales/zeros [N, G]."""
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    s = scales.to(torch.float32)
    scale_zero = torch.stack([s, s * (8 - zeros.to(torch.float32))], -1)
    return weight, scale_zero.transpose(0, 1).contiguous().to(torch.bfloat16)


def layout(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
           unpack_codes, unpack_zeros) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached layout of one layer; ``unpack_codes()``/``unpack_zeros()`` give codes
    [N, K] and zeros [N, G] when it must be (re)built."""
    key = id(packed)
    versions = (_version(packed), _version(scales), _version(zeros), id(scales), id(zeros))
    entry = _cache.get(key)
    if entry is not None and entry[0]() is packed and entry[1] == versions:
        stats["hits"] += 1
        return entry[2]
    built = build_layout(unpack_codes(), scales, unpack_zeros())
    _cache[key] = (weakref.ref(packed, lambda _, k=key: _cache.pop(k, None)), versions, built)
    stats["built"] += 1
    return built


def _version(t: torch.Tensor) -> int:
    """The in-place-write counter; inference tensors have none (and cannot change outside
    inference mode), so they count as version −1."""
    try:
        return t._version
    except RuntimeError:
        return -1


def matmul(x: torch.Tensor, weight: torch.Tensor, scale_zero: torch.Tensor,
           group_size: int) -> torch.Tensor:
    """``x [M, K] bf16 @ Wᵀ`` → bf16 [M, N] (fp32 accumulation inside the kernel)."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, group_size, scale_zero)


def clear_cache() -> None:
    _cache.clear()


class Int4PackLinear(nn.Module):
    """``y = x @ Wᵀ + b`` from the int4pack layout alone, computed in bf16."""

    @classmethod
    def eligible(cls, w) -> bool:
        """A 4-bit ``BabaiQuantizedTensor`` the int4pack kernel can hold."""
        return (w.bits == 4 and w.group_size in GROUP_SIZES and w.out_features % 16 == 0
                and w.outlier_ptr is None)

    @classmethod
    def from_weight(cls, w, bias: torch.Tensor | None) -> Int4PackLinear:
        weight, scale_zero = build_layout(w.codes(), w.scale, w.zero_points())
        return cls(weight, scale_zero, bias, w.group_size, w.in_features)

    def __init__(self, weight: torch.Tensor, scale_zero: torch.Tensor,
                 bias: torch.Tensor | None, group_size: int, in_features: int):
        super().__init__()
        self.register_buffer("weight_int4pack", weight)
        self.register_buffer("scale_zero", scale_zero)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.group_size, self.in_features = group_size, in_features
        self.out_features = weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = matmul(x2, self.weight_int4pack, self.scale_zero, self.group_size)
        if self.bias is not None:
            y = y + self.bias.to(torch.bfloat16)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, int4pack (bf16 compute)")
