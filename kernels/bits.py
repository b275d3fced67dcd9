"""Reading b-bit codes from the packed byte format of ``babai_ao.formats.packing`` inside Triton.

Code ``i`` of a packed row starts at bit ``i·b``: byte ``j = i·b // 8``, shift ``r = i·b % 8``,
and ``q = ((p[j] | p[j+1] << 8) >> r) & (2^b − 1)``. When ``b`` divides 8 a code never
straddles two bytes, so one byte load suffices; 3-bit codes need the second byte (masked
past the row end, where it only holds padding).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def read_codes(row_ptr, idx, row_bytes, mask, BITS: tl.constexpr):
    """int32 codes number ``idx`` (any shape) of the packed byte rows at ``row_ptr``."""
    bit = idx * BITS
    byte = bit // 8
    shift = bit % 8
    lo = tl.load(row_ptr + byte, mask=mask, other=0).to(tl.int32)
    if 8 % BITS == 0:
        word = lo
    else:
        hi = tl.load(row_ptr + byte + 1, mask=mask & (byte + 1 < row_bytes), other=0)
        word = lo | (hi.to(tl.int32) << 8)
    return (word >> shift) & ((1 << BITS) - 1)


@triton.jit
def read_tile(rows, k0, row_bytes, n_mask, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """int32 codes ``k0 … k0+BLOCK_K−1`` (``k0`` a multiple of 8) of the ``BLOCK_N`` packed
    rows at ``rows`` [1, BLOCK_N], as a [BLOCK_K, BLOCK_N] tile.

    Every byte is loaded once, as part of a tile contiguous along K (vectorized loads), and
    unpacked in registers: a byte holds ``8/b`` codes when ``b`` divides 8; otherwise ``b``
    consecutive bytes hold 8 codes (a ``8b``-bit little-endian word).
    """
    if 8 % BITS == 0:
        PER: tl.constexpr = 8 // BITS  # codes per byte
        byte = k0 // PER + tl.arange(0, BLOCK_K // PER)
        word = tl.load(rows + byte[:, None], mask=(byte[:, None] < row_bytes) & n_mask,
                       other=0).to(tl.int32)
    else:
        tl.static_assert(BITS < 4, "an 8-code word must fit 32 bits")
        PER: tl.constexpr = 8  # codes per BITS-byte word
        byte = (k0 // 8) * BITS + tl.arange(0, BLOCK_K // 8) * BITS
        word = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.int32)
        for i in tl.static_range(BITS):
            b = tl.load(rows + byte[:, None] + i, mask=(byte[:, None] + i < row_bytes) & n_mask,
                        other=0)
            word |= b.to(tl.int32) << (8 * i)
    if PER == 1:
        return word
    shift = tl.arange(0, PER) * BITS
    q = (word[:, None, :] >> shift[None, :, None]) & ((1 << BITS) - 1)
    return tl.reshape(q, (BLOCK_K, BLOCK_N))
