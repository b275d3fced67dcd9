"""Standalone dequant kernel: the float weight ``W[n, k] = s[n, k//g] · (q[n, k] − z[n, k//g])``
(plus SSQR outliers) from the packed format, for tests, export and one-off materialization.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .bits import read_codes
from .configs import elementwise_configs
from .outliers import launch_outlier_scatter


@triton.jit
def _dequant(packed_ptr, s_ptr, z_ptr, w_ptr, N, K, G, row_bytes, z_bytes,
             BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    q = read_codes(packed_ptr + offs_n[:, None] * row_bytes, offs_k[None, :], row_bytes, mask,
                   BITS)
    gidx = offs_n[:, None] * G + offs_k[None, :] // GROUP
    z = read_codes(z_ptr, gidx, z_bytes, mask, BITS)
    s = tl.load(s_ptr + gidx, mask=mask, other=0.0).to(tl.float32)
    w = (q - z).to(tl.float32) * s
    tl.store(w_ptr + offs_n[:, None] * K + offs_k[None, :], w.to(w_ptr.dtype.element_ty),
             mask=mask)


dequant_kernel = triton.autotune(elementwise_configs(), key=["N", "K", "BITS", "GROUP"])(_dequant)


def launch_dequant(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                   group_size: int, out: torch.Tensor, outlier_ptr: torch.Tensor | None = None,
                   outlier_idx: torch.Tensor | None = None,
                   outlier_val: torch.Tensor | None = None) -> None:
    """Fill ``out`` [N, K] (any float dtype) with the dequantized weight."""
    n, k = out.shape

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(k, meta["BLOCK_K"]))

    wrap_triton(dequant_kernel)[grid](packed, scales, zeros, out, n, k, k // group_size,
                                      packed.shape[1], zeros.numel(), BITS=bits,
                                      GROUP=group_size)
    if outlier_ptr is not None:
        launch_outlier_scatter(outlier_ptr, outlier_idx, outlier_val, scales, group_size, out)
