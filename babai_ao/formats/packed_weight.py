"""The packed weight format: what the stored tensors of a babai layer mean, as float math.

A layer [N, K] in groups of ``g`` columns is stored as b-bit codes ``q`` packed per row
(``babai_ao.formats.packing``), scales ``s`` [N, K/g], zero codes ``z`` packed flat (N·K/g
codes at b bits) and an optional sparse integer correction ``δ`` in CSR form (SSQR's
outliers: row pointers [N+1], column indices, integer deltas):

    W[n, k] = s[n, k//g] · (q[n, k] − z[n, k//g])  +  s[n, k//g] · δ[n, k]

Here are the shape checks of that format and its float references — the whole weight
(``dequantize_packed``) and a gather of rows (``embedding_rows``, a quantized embedding
table's lookup) — which the ``babai::`` ops (``babai_ao.ao.ops``), the exporters and the
tests share. Pure torch, float32 arithmetic.
"""

from __future__ import annotations

import torch

from babai_ao.errors import BabaiError
from babai_ao.lattice.grid import SUPPORTED_BITS

from .packing import packed_size, unpack


def check_packed(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                 group_size: int, in_features: int) -> None:
    """Shape/dtype checks of the storage format (no data-dependent checks: compile-safe)."""
    if bits not in SUPPORTED_BITS:
        raise BabaiError(f"bits={bits} is not a packed width: use one of {SUPPORTED_BITS}")
    if group_size <= 0 or in_features % group_size:
        raise BabaiError(f"in_features={in_features} is not a multiple of group_size="
                         f"{group_size}: quantize with a group size that divides in_features")
    n = packed.shape[0]
    g = in_features // group_size
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (n, packed_size(in_features, bits)):
        raise BabaiError(f"packed must be uint8 [N, {packed_size(in_features, bits)}] for "
                         f"{in_features} {bits}-bit codes, got {packed.dtype} "
                         f"{tuple(packed.shape)}: pack the codes with babai_ao.formats.packing.pack")
    if tuple(scales.shape) != (n, g):
        raise BabaiError(f"scales must be [N, G] = [{n}, {g}], got {tuple(scales.shape)}")
    if zeros.dtype != torch.uint8 or zeros.numel() != packed_size(n * g, bits):
        raise BabaiError(f"zeros must be the N·G={n * g} zero codes packed flat at {bits} "
                         f"bits ({packed_size(n * g, bits)} uint8), got {zeros.dtype} "
                         f"{tuple(zeros.shape)}: pack zeros.reshape(1, -1)")


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


def zero_codes(zeros: torch.Tensor, bits: int, rows: torch.Tensor, groups: int) -> torch.Tensor:
    """Zero codes [T, G] (int64) of ``rows`` from the N·G zeros packed flat at ``bits``.

    Code ``j`` of the flat stream sits at bit ``j·b``: byte ``j·b // 8``, shift ``j·b % 8``,
    and straddles into the next byte only for 3 bit (``babai_ao.formats.packing``).
    """
    idx = rows.reshape(-1, 1).to(torch.int64) * groups + torch.arange(
        groups, device=rows.device)
    bit = idx * bits
    byte = bit // 8
    p = zeros.reshape(-1).to(torch.int64)
    lo = p.index_select(0, byte.reshape(-1)).reshape(byte.shape)
    hi = p.index_select(0, (byte + 1).clamp(max=p.numel() - 1).reshape(-1)).reshape(byte.shape)
    word = lo + hi * 256  # ATen ops an exported graph keeps as they are (no Scalar shifts)
    return torch.bitwise_and(torch.bitwise_right_shift(word, bit % 8), (1 << bits) - 1)


def embedding_rows(indices: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                   zeros: torch.Tensor, bits: int, group_size: int, embedding_dim: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference of ``babai::embedding``: dequantize the gathered rows only (module doc)."""
    groups = embedding_dim // group_size
    flat = indices.reshape(-1).to(torch.int64)
    q = unpack(packed.index_select(0, flat), bits, embedding_dim).to(torch.float32)
    z = zero_codes(zeros, bits, flat, groups).to(torch.float32)
    s = scales.index_select(0, flat).to(torch.float32)
    e = (q.reshape(-1, groups, group_size) - z[..., None]) * s[..., None]
    return e.reshape(*indices.shape, embedding_dim).to(dtype)
