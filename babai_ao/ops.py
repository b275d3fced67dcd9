"""The ``babai::`` custom ops: one op per quantized linear, seen whole by compile and export.

``babai::linear(x, packed, scales, zeros, bias, bits, group_size, in_features,
outlier_ptr, outlier_idx, outlier_val)`` computes ``x @ Wᵀ + bias`` with

    W[n, k] = s[n, k//g] · (q[n, k] − z[n, k//g])  +  s[n, k//g] · δ[n, k]

where ``q`` are b-bit codes packed per row (``babai_ao.packing``), ``z`` the group zeros
packed flat (N·G codes at b bits), and ``δ`` an optional sparse integer correction in CSR
form (row pointers [N+1], column indices, integer deltas) — SSQR's outliers. The reference
implementation here runs on any device; ``babai_ao.kernels`` registers fused kernels.
"""

from __future__ import annotations

import torch

from .packing import unpack


def dequantize_packed(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
    outlier_ptr: torch.Tensor | None = None,
    outlier_idx: torch.Tensor | None = None,
    outlier_val: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Float weight [N, K] from the packed format (reference; used by tests and fallbacks)."""
    n = packed.shape[0]
    g = in_features // group_size
    q = unpack(packed, bits, in_features).to(dtype)
    z = unpack(zeros.reshape(1, -1), bits, n * g).reshape(n, g).to(dtype)
    s = scales.to(dtype)
    w = (q.reshape(n, g, group_size) - z[..., None]) * s[..., None]
    w = w.reshape(n, in_features)
    if outlier_ptr is not None:
        rows = torch.repeat_interleave(torch.arange(n, device=packed.device),
                                       outlier_ptr[1:] - outlier_ptr[:-1])
        cols = outlier_idx.to(torch.int64)
        w = w.index_put((rows, cols), s[rows, cols // group_size] * outlier_val.to(dtype),
                        accumulate=True)
    return w


@torch.library.custom_op("babai::linear", mutates_args=())
def linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    outlier_ptr: torch.Tensor | None = None,
    outlier_idx: torch.Tensor | None = None,
    outlier_val: torch.Tensor | None = None,
) -> torch.Tensor:
    w = dequantize_packed(packed, scales, zeros, bits, group_size, in_features,
                          outlier_ptr, outlier_idx, outlier_val, dtype=torch.float32)
    out = torch.nn.functional.linear(x.to(torch.float32), w,
                                     None if bias is None else bias.to(torch.float32))
    return out.to(x.dtype)


@linear.register_fake
def _(x, packed, scales, zeros, bias, bits, group_size, in_features,
      outlier_ptr=None, outlier_idx=None, outlier_val=None):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))
