"""Reading b-bit codes from the packed byte format of ``babai_ao.packing`` inside Triton.

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
