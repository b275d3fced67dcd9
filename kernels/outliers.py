"""SSQR sparse outliers (CSR) on top of the dense packed weight.

The full weight is ``W = dense + s[n, k//g] · δ[n, k]`` with ``δ`` integer and sparse, rows
``ptr[n]:ptr[n+1]`` of (``idx``, ``val``). Two kernels, one program per weight row ``n``:

* ``outlier_matmul``: ``out[m, n] += Σ_j x[m, perm[idx_j]] · s[n, idx_j//g] · val_j``
  (adds into an fp32 output after the dense matmul; a second launch);
* ``outlier_scatter``: ``W[n, idx_j] += s[n, idx_j//g] · val_j`` (for the dequant kernel).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

BLOCK_J = 32


@triton.jit
def _outlier_matmul(x_ptr, perm_ptr, ptr_ptr, idx_ptr, val_ptr, s_ptr, out_ptr, M, N, K, G,
                    GROUP: tl.constexpr, HAS_PERM: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr):
    n = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    start = tl.load(ptr_ptr + n).to(tl.int32)
    end = tl.load(ptr_ptr + n + 1).to(tl.int32)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for j0 in range(start, end, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        j_mask = offs_j < end
        col = tl.load(idx_ptr + offs_j, mask=j_mask, other=0).to(tl.int32)
        val = tl.load(val_ptr + offs_j, mask=j_mask, other=0).to(tl.float32)
        s = tl.load(s_ptr + n * G + col // GROUP, mask=j_mask, other=0.0).to(tl.float32)
        if HAS_PERM:  # noqa: SIM108  (constexpr branch in Triton)
            xcol = tl.load(perm_ptr + col, mask=j_mask, other=0)
        else:
            xcol = col
        x = tl.load(x_ptr + offs_m[:, None] * K + xcol[None, :],
                    mask=m_mask[:, None] & j_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(x * (s * val)[None, :], axis=1)
    out = out_ptr + offs_m * N + n
    tl.store(out, tl.load(out, mask=m_mask, other=0.0) + acc, mask=m_mask)


@triton.jit
def _outlier_scatter(ptr_ptr, idx_ptr, val_ptr, s_ptr, w_ptr, K, G,
                     GROUP: tl.constexpr, BLOCK_J: tl.constexpr):
    n = tl.program_id(0)
    start = tl.load(ptr_ptr + n).to(tl.int32)
    end = tl.load(ptr_ptr + n + 1).to(tl.int32)
    for j0 in range(start, end, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        j_mask = offs_j < end
        col = tl.load(idx_ptr + offs_j, mask=j_mask, other=0).to(tl.int32)
        val = tl.load(val_ptr + offs_j, mask=j_mask, other=0).to(tl.float32)
        s = tl.load(s_ptr + n * G + col // GROUP, mask=j_mask, other=0.0).to(tl.float32)
        w = w_ptr + n * K + col
        old = tl.load(w, mask=j_mask, other=0.0).to(tl.float32)
        tl.store(w, (old + s * val).to(w_ptr.dtype.element_ty), mask=j_mask)


def launch_outlier_matmul(x2: torch.Tensor, perm: torch.Tensor | None, ptr: torch.Tensor,
                          idx: torch.Tensor, val: torch.Tensor, scales: torch.Tensor,
                          group_size: int, out: torch.Tensor) -> None:
    """``out`` (fp32 [M, N]) ``+= x2[:, perm] @ (s·δ)ᵀ``."""
    m, k = x2.shape
    n, g = scales.shape
    block_m = 16 if m <= 16 else 64
    wrap_triton(_outlier_matmul)[(n, triton.cdiv(m, block_m))](
        x2, perm if perm is not None else ptr, ptr, idx, val, scales, out, m, n, k, g,
        GROUP=group_size, HAS_PERM=perm is not None, BLOCK_M=block_m, BLOCK_J=BLOCK_J)


def launch_outlier_scatter(ptr: torch.Tensor, idx: torch.Tensor, val: torch.Tensor,
                           scales: torch.Tensor, group_size: int, w: torch.Tensor) -> None:
    """``w`` [N, K] ``+= s·δ`` in place (CSR columns of a row must be distinct)."""
    n, k = w.shape
    wrap_triton(_outlier_scatter)[(n,)](ptr, idx, val, scales, w, k, scales.shape[1],
                                        GROUP=group_size, BLOCK_J=BLOCK_J)
