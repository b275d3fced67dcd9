"""Fused dequant-matmul: ``out = x[:, perm] @ Wᵀ + bias`` reading packed codes, never a float W.

``W[n, k] = s[n, k//g] · (q[n, k] − z[n, k//g])`` is rebuilt tile by tile in registers
(``q`` and ``z`` read with ``read_codes``) and fed to ``tl.dot`` with fp32 accumulation.
When a K tile lies inside one group (``g % BLOCK_K == 0``, both compile-time) the integer tile ``q − z`` (exact
in fp16/bf16) goes to the dot and the scale multiplies the fp32 partial sum; otherwise
each element is scaled before the dot. One kernel body, two tunings:

* decode (M ≤ 16): GEMV-like, one 16-row block, split-K with fp32 atomic adds;
* prefill (M > 16): tiled GEMM, no split.

``perm`` (optional) gathers activation columns on load, so act-order needs no weight gather.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .bits import read_codes, read_tile
from .configs import INTERPRET, decode_configs, prefill_configs, whole_groups

DECODE_MAX_M = 16
_INTERPRET = tl.constexpr(INTERPRET)  # a jit function may read only constexpr globals


@triton.jit
def _dot(a, b, FP32: tl.constexpr):
    """fp32-accumulated ``a @ b``; exact fp32 products for fp32 inputs (no tf32).

    Under the interpreter operands go through fp32: its bf16 ``tl.dot`` returns garbage
    (triton 3.9), and fp32 products of bf16/fp16 values are what the GPU computes anyway.
    """
    if FP32 or _INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _dequant_matmul(
    x_ptr, perm_ptr, packed_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K, G, row_bytes, z_bytes, M_BUCKET,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
    FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    rows = packed_ptr + offs_n[None, :] * row_bytes  # [1, BN] byte row bases
    tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(tiles, SPLIT_K)
    t_end = tl.minimum(tiles, (pid_k + 1) * per_split)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(pid_k * per_split, t_end):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        if HAS_PERM:  # noqa: SIM108  (constexpr branch in Triton)
            cols = tl.load(perm_ptr + offs_k, mask=k_mask, other=0)
        else:
            cols = offs_k
        x = tl.load(x_ptr + offs_m[:, None] * K + cols[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        q = read_tile(rows, t * BLOCK_K, row_bytes, n_mask[None, :], BITS, BLOCK_K, BLOCK_N)
        if GROUP % BLOCK_K == 0:
            gidx = offs_n[None, :] * G + (t * BLOCK_K) // GROUP  # [1, BN]
            z = read_codes(z_ptr, gidx, z_bytes, n_mask[None, :], BITS)
            s = tl.load(s_ptr + gidx, mask=n_mask[None, :], other=0.0).to(tl.float32)
            acc += _dot(x, (q - z).to(tl.float32).to(x.dtype), FP32_DOT) * s  # exact integers
        else:
            w_mask = k_mask[:, None] & n_mask[None, :]
            gidx = offs_n[None, :] * G + offs_k[:, None] // GROUP  # [BK, BN]
            z = read_codes(z_ptr, gidx, z_bytes, w_mask, BITS)
            s = tl.load(s_ptr + gidx, mask=w_mask, other=0.0).to(tl.float32)
            acc += _dot(x, ((q - z).to(tl.float32) * s).to(x.dtype), FP32_DOT)
    if HAS_BIAS:  # noqa: SIM102  (constexpr outer, runtime inner)
        if pid_k == 0:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m[:, None] * N + offs_n[None, :]
    o_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        tl.atomic_add(out, acc, mask=o_mask)


# one tuned config per shape, width, group and layout (dtypes join the key on their own)
_KEY = ["N", "K", "M_BUCKET", "BITS", "GROUP", "HAS_PERM"]
_PRUNE = {"early_config_prune": whole_groups}
decode_kernel = triton.autotune(decode_configs(), key=_KEY, prune_configs_by=_PRUNE,
                                reset_to_zero=["out_ptr"])(_dequant_matmul)
prefill_kernel = triton.autotune(prefill_configs(), key=_KEY, prune_configs_by=_PRUNE)(
    _dequant_matmul)


def launch_dequant_matmul(
    x2: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    bias: torch.Tensor | None, perm: torch.Tensor | None, bits: int, group_size: int,
    in_features: int, out: torch.Tensor,
) -> None:
    """Write ``x2[:, perm] @ Wᵀ (+ bias)`` into ``out`` [M, N].

    ``out`` must be fp32 and zero-filled for decode (M ≤ 16, split-K atomics); for prefill
    it may be any float dtype and is overwritten.
    """
    m, k = x2.shape
    n = packed.shape[0]
    g = k // group_size
    decode = m <= DECODE_MAX_M
    kernel = decode_kernel if decode else prefill_kernel

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

    wrap_triton(kernel)[grid](
        x2, perm if perm is not None else x2, packed, scales, zeros,
        bias if bias is not None else x2, out,
        m, n, k, g, packed.shape[1], zeros.numel(), triton.next_power_of_2(m),
        BITS=bits, GROUP=group_size, HAS_PERM=perm is not None, HAS_BIAS=bias is not None,
        FP32_DOT=x2.dtype == torch.float32,
    )
