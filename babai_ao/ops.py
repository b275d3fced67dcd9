"""The ``babai::`` custom ops: one op per quantized linear, seen whole by compile and export.

``babai::linear(x, packed, scales, zeros, bias, bits, group_size, in_features,
outlier_ptr, outlier_idx, outlier_val, act_perm)`` computes ``x[..., perm] @ Wᵀ + bias`` with

    W[n, k] = s[n, k//g] · (q[n, k] − z[n, k//g])  +  s[n, k//g] · δ[n, k]

where ``q`` are b-bit codes packed per row (``babai_ao.packing``), ``z`` the group zeros
packed flat (N·G codes at b bits), ``δ`` an optional sparse integer correction in CSR
form (row pointers [N+1], column indices, integer deltas) — SSQR's outliers — and ``perm``
an optional gather of the activation columns (``None``: identity). ``babai::dequantize``
returns ``W`` itself (the pattern ``babai_ao.passes`` rewrites away).
``babai::hptq_linear`` computes ``x @ (s·Q)ᵀ + bias`` from an HPTQ weight as stored — the
canonical-Huffman stream of ``babai_ao.huffman`` — with ``s`` one scale or one per row. The implementations
here are the references; importing this module registers the device kernels of
``babai_ao.kernels`` (Triton on CUDA, a vectorized unpack on CPU).
"""

from __future__ import annotations

import torch

from . import huffman
from .errors import BabaiError
from .grid import SUPPORTED_BITS
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
                         f"{tuple(packed.shape)}: pack the codes with babai_ao.packing.pack")
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
    act_perm: torch.Tensor | None = None,
) -> torch.Tensor:
    w = dequantize_packed(packed, scales, zeros, bits, group_size, in_features,
                          outlier_ptr, outlier_idx, outlier_val, dtype=torch.float32)
    xf = x.to(torch.float32)
    if act_perm is not None:
        xf = xf.index_select(-1, act_perm)
    out = torch.nn.functional.linear(xf, w, None if bias is None else bias.to(torch.float32))
    return out.to(x.dtype)


@linear.register_fake
def _(x, packed, scales, zeros, bias, bits, group_size, in_features,
      outlier_ptr=None, outlier_idx=None, outlier_val=None, act_perm=None):
    check_packed(packed, scales, zeros, bits, group_size, in_features)
    if x.shape[-1] != in_features:
        raise BabaiError(f"x has {x.shape[-1]} features, the layer expects {in_features}")
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


@torch.library.custom_op("babai::dequantize", mutates_args=())
def dequantize(
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
    """``W`` [N, K] in ``dtype``; a float weight, so compiled models should not keep it."""
    return dequantize_packed(packed, scales, zeros, bits, group_size, in_features,
                             outlier_ptr, outlier_idx, outlier_val, dtype)


@dequantize.register_fake
def _(packed, scales, zeros, bits, group_size, in_features, outlier_ptr=None,
      outlier_idx=None, outlier_val=None, dtype=torch.float32):
    check_packed(packed, scales, zeros, bits, group_size, in_features)
    return packed.new_empty((packed.shape[0], in_features), dtype=dtype)


def check_hptq(x: torch.Tensor, scale: torch.Tensor, out_features: int, in_features: int,
               max_len: int) -> None:
    """Shape checks of ``babai::hptq_linear`` (compile-safe)."""
    if x.shape[-1] != in_features:
        raise BabaiError(f"x has {x.shape[-1]} features, the layer expects {in_features}")
    if scale.numel() not in (1, out_features):
        raise BabaiError(f"HPTQ scale must hold 1 or {out_features} values, got "
                         f"{scale.numel()}: the checkpoint is corrupt")
    if not 0 <= max_len <= huffman.MAX_LEN_LIMIT:
        raise BabaiError(f"Huffman code length limit {max_len} is outside 0.."
                         f"{huffman.MAX_LEN_LIMIT}: the stream header is corrupt")


@torch.library.custom_op("babai::hptq_linear", mutates_args=())
def hptq_linear(
    x: torch.Tensor,
    bitstream: torch.Tensor,
    symbols: torch.Tensor,
    lengths: torch.Tensor,
    offsets: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    in_features: int,
    chunk: int,
    max_len: int,
) -> torch.Tensor:
    """Reference: decode the stream (``huffman.decode``), then one float32 linear."""
    check_hptq(x, scale, out_features, in_features, max_len)
    header = torch.tensor([out_features * in_features, chunk, max_len], dtype=torch.int64)
    stream = huffman.HuffmanStream(bitstream.cpu(), symbols.cpu(), lengths.cpu(),
                                   offsets.cpu(), header)
    q = huffman.decode(stream).reshape(out_features, in_features).to(x.device, torch.float32)
    w = scale.to(torch.float32).reshape(-1, 1) * q
    b = None if bias is None else bias.to(torch.float32)
    return torch.nn.functional.linear(x.to(torch.float32), w, b).to(x.dtype)


@hptq_linear.register_fake
def _(x, bitstream, symbols, lengths, offsets, scale, bias, out_features, in_features, chunk,
      max_len):
    check_hptq(x, scale, out_features, in_features, max_len)
    return x.new_empty((*x.shape[:-1], out_features))


from babai_ao.kernels import register as _register  # noqa: E402,F401  (device kernels)
