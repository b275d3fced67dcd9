"""CPU path of ``babai::linear``: vectorized unpack of whole rows, dequant, one ``mm``.

Unpacking uses byte-wide shifts (``b`` ∈ {2, 4, 8}: codes never straddle a byte) or one
24-bit word per 3 bytes (3-bit: 8 codes), instead of the reference's int64 words. The
dequantized weight ``W = s·(q − z)`` (+ SSQR's ``s·δ``) lives only inside this call (the op
is opaque to compile, so no float weight appears in any graph) and is the reference's to
the bit, so this exact path equals ``F.linear(x, W, bias)`` in fp32 bit for bit (weights up
to ``EXACT_MAX_WEIGHTS`` entries; larger ones go in row blocks). 4-bit layers with bf16
activations take the int4pack kernel instead (``cpu_int4``).
"""

from __future__ import annotations

import torch

from . import cpu_int4

EXACT_MAX_WEIGHTS = 2**26  # the exact path's float weight: ≤ 256 MiB at a time


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """First ``n`` codes of each packed row, as uint8 (same result as ``packing.unpack``)."""
    rows = packed.shape[0]
    if bits == 8:
        return packed[:, :n]
    if 8 % bits == 0:  # stacking shifted copies measured 3x faster than a broadcast shift
        codes = torch.stack([(packed >> i) & (2**bits - 1) for i in range(0, 8, bits)], -1)
    else:  # 3 bits: 3 bytes hold 8 codes
        b = packed.reshape(rows, -1, 3).to(torch.int32)
        word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
        shifts = torch.arange(0, 24, 3, dtype=torch.int32, device=packed.device)
        codes = ((word[..., None] >> shifts) & 7).to(torch.uint8)
    return codes.reshape(rows, -1)[:, :n]


def dequantize_rows(packed: torch.Tensor, scales: torch.Tensor, z: torch.Tensor, bits: int,
                    group_size: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """``W = s·(q − z)`` for a block of rows; ``z`` already unpacked [rows, G]."""
    rows, g = scales.shape
    q = unpack_rows(packed, bits, in_features).reshape(rows, g, group_size).to(dtype)
    return ((q - z.to(dtype)[..., None]) * scales.to(dtype)[..., None]).reshape(rows, -1)


def _exact(x2: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, z: torch.Tensor,
           bias: torch.Tensor | None, bits: int, group_size: int, in_features: int,
           outlier_ptr: torch.Tensor | None, outlier_idx: torch.Tensor | None,
           outlier_val: torch.Tensor | None) -> torch.Tensor:
    """fp32 ``x2 @ Wᵀ + bias`` with ``W`` dequantized as the reference does (``s·(q − z)``,
    then ``s·δ`` added at the outliers): one ``F.linear`` on the whole weight while it has at
    most ``EXACT_MAX_WEIGHTS`` entries — bit-exact vs ``F.linear(x, W, bias)`` — else row
    blocks of that size (the same products, the GEMM may block them differently)."""
    n = packed.shape[0]
    b = None if bias is None else bias.to(torch.float32)
    rows_per = max(1, EXACT_MAX_WEIGHTS // max(1, in_features))
    outs = []
    for r0 in range(0, n, rows_per):
        r1 = min(n, r0 + rows_per)
        w = dequantize_rows(packed[r0:r1], scales[r0:r1], z[r0:r1], bits, group_size,
                            in_features, torch.float32)
        if outlier_ptr is not None and outlier_idx.numel():
            a, e = int(outlier_ptr[r0]), int(outlier_ptr[r1])
            rows = torch.repeat_interleave(torch.arange(r1 - r0),
                                           outlier_ptr[r0 + 1:r1 + 1] - outlier_ptr[r0:r1])
            cols = outlier_idx[a:e].to(torch.int64)
            s = scales[r0:r1].to(torch.float32)
            w = w.index_put((rows, cols), s[rows, cols // group_size]
                            * outlier_val[a:e].to(torch.float32), accumulate=True)
        outs.append(torch.nn.functional.linear(x2, w, None if b is None else b[r0:r1]))
    return outs[0] if len(outs) == 1 else torch.cat(outs, -1)


def linear_cpu(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
               zeros: torch.Tensor, bias: torch.Tensor | None, bits: int, group_size: int,
               in_features: int, outlier_ptr: torch.Tensor | None = None,
               outlier_idx: torch.Tensor | None = None, outlier_val: torch.Tensor | None = None,
               act_perm: torch.Tensor | None = None) -> torch.Tensor:
    """``x[..., perm] @ Wᵀ + bias``, computed in float32 (bf16/fp16 only at the ends), or
    by the int4pack kernel for 4-bit layers and bf16 ``x`` (``cpu_int4.supported``)."""
    n, g = scales.shape
    x2 = x.reshape(-1, in_features)
    if act_perm is not None:
        x2 = x2.index_select(1, act_perm)

    def zero_codes() -> torch.Tensor:
        return unpack_rows(zeros.reshape(1, -1), bits, n * g).reshape(n, g)

    if x2.shape[0] and cpu_int4.supported(x.dtype, bits, group_size, n):
        weight, scale_zero = cpu_int4.layout(
            packed, scales, zeros, lambda: unpack_rows(packed, bits, in_features), zero_codes)
        out = cpu_int4.matmul(x2.contiguous(), weight, scale_zero, group_size).float()
        if outlier_ptr is not None and outlier_idx.numel():
            rows = torch.repeat_interleave(torch.arange(n), outlier_ptr[1:] - outlier_ptr[:-1])
            cols = outlier_idx.to(torch.int64)
            delta = scales[rows, cols // group_size].float() * outlier_val.to(torch.float32)
            out.index_add_(1, rows, x2[:, cols].to(torch.float32) * delta)
        if bias is not None:
            out += bias.to(torch.float32)
    else:
        out = _exact(x2.to(torch.float32), packed, scales, zero_codes(), bias, bits,
                     group_size, in_features, outlier_ptr, outlier_idx, outlier_val)
    return out.to(x.dtype).contiguous().reshape(*x.shape[:-1], n)
