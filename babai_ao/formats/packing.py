"""Bit packing of b-bit codes (b in 2, 3, 4, 8) into bytes, little-endian.

Codes are packed along the last dimension in runs of 8: eight b-bit codes make one
``8b``-bit little-endian word stored as ``b`` bytes, code ``i`` of the run at bit ``i·b``.
So code ``k`` of a row starts at bit ``k·b`` of the row's byte string: byte ``k·b // 8``,
shift ``k·b % 8``, and may straddle into the next byte (3-bit). Rows are padded with zero
codes to a multiple of 8, so a row of ``K`` codes takes ``ceil(K/8)·b`` bytes.
A kernel reads code ``k`` as ``((p[k·b//8] | p[k·b//8 + 1] << 8) >> (k·b % 8)) & (2^b − 1)``
(the second byte is absent only for the very last code when b divides 8, where it is unused).
"""

from __future__ import annotations

import torch

from babai_ao.errors import BabaiError
from babai_ao.lattice.grid import SUPPORTED_BITS


def packed_size(n: int, bits: int) -> int:
    """Bytes for ``n`` codes of ``bits`` bits."""
    return (n + 7) // 8 * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2^bits)`` along the last dim into uint8."""
    if bits not in SUPPORTED_BITS:
        raise BabaiError(f"cannot pack {bits}-bit codes: supported {SUPPORTED_BITS}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise BabaiError(f"codes outside [0, {2**bits - 1}] cannot be packed at {bits} bits: "
                         "quantize with clip=True or use a no-clipping format (ssqr/hptq)")
    *lead, k = codes.shape
    pad = (-k) % 8
    if bits == 8:
        return torch.nn.functional.pad(codes.to(torch.uint8), (0, pad))
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, pad)).reshape(*lead, -1, 8)
    word = (c << (torch.arange(8, device=c.device) * bits)).sum(-1)  # < 2^(8·bits) ≤ 2^32
    byte_shift = torch.arange(bits, device=c.device) * 8
    out = (word[..., None] >> byte_shift) & 0xFF
    return out.to(torch.uint8).reshape(*lead, -1)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack``: the first ``n`` codes of each row, as uint8."""
    *lead, nb = packed.shape
    if bits == 8:
        return packed[..., :n]
    b = packed.to(torch.int64).reshape(*lead, nb // bits, bits)
    word = (b << (torch.arange(bits, device=b.device) * 8)).sum(-1)
    codes = (word[..., None] >> (torch.arange(8, device=b.device) * bits)) & (2**bits - 1)
    return codes.reshape(*lead, -1)[..., :n].to(torch.uint8)
