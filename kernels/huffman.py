"""Triton kernels for HPTQ's canonical-Huffman streams (format: ``babai_ao.formats.huffman``).

Each lane of a program owns one chunk of the stream: it starts at the chunk's bit offset
(the stored chunk index) and decodes ``chunk`` symbols one after another, reading the
``L``-bit window at its cursor (four byte loads, big-endian) and looking it up in the
``2^L`` decode table, whose entries are ``symbol·32 + length``. Chunks are independent, so a
program decodes ``BLOCK_C`` of them in lockstep.

* ``huffman_decode``: the codes themselves (int32), at load time;
* ``hptq_matmul``: ``y[m, r] = s_r · Σ_k q[r, k]·x[m, k]`` straight from the stream — the
  weight stays entropy-coded in memory. Symbol ``i`` of the stream is ``q[i // K, i % K]``;
  a lane accumulates its current row in registers and adds it into ``y`` (fp32, atomics)
  when the row ends or the chunk does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .configs import INTERPRET

LEN_BITS = 5  # table entry = symbol << 5 | code length (lengths ≤ 24 < 32)


def decode_table(symbols: torch.Tensor, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """int32 [2^L]: entry ``w`` (an ``L``-bit window) = ``symbol << 5 | length`` of the code
    that starts the window. Canonical codes of one length fill a contiguous run of windows."""
    windows = torch.arange(1 << max_len, device=lengths.device)
    if lengths.numel() == 0:
        return torch.zeros_like(windows, dtype=torch.int32)
    lengths = lengths.to(torch.int64)
    entry = (symbols.to(torch.int64) << LEN_BITS) | lengths
    ends = torch.cumsum(torch.ones_like(lengths) << (max_len - lengths), 0)  # run ends
    # a static [2^L] shape (searchsorted, not repeat_interleave), so it traces under compile
    run = torch.searchsorted(ends, windows, right=True).clamp(max=entry.numel() - 1)
    # windows past the last run begin no code (Kraft sum < 1)
    return torch.where(windows < ends.max(), entry.gather(0, run), 0).to(torch.int32)


@triton.jit
def _window(stream_ptr, pos, nbytes, mask, max_len):
    """The ``max_len`` bits starting at bit ``pos`` of the stream (MSB first), int32."""
    byte = pos >> 3
    word = tl.zeros_like(pos).to(tl.uint32)
    for i in tl.static_range(4):
        b = tl.load(stream_ptr + byte + i, mask=mask & (byte + i < nbytes), other=0)
        word = (word << 8) | b.to(tl.uint32)
    shift = tl.minimum(32 - max_len - (pos & 7), 31)  # L = 0: shift 31, mask 0
    return ((word >> shift.to(tl.uint32)) & ((1 << max_len) - 1)).to(tl.int32)


@triton.jit
def _huffman_decode(stream_ptr, offsets_ptr, table_ptr, out_ptr, n, n_chunks, nbytes, chunk,
                    max_len, BLOCK_C: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    live = c < n_chunks
    pos = tl.load(offsets_ptr + c, mask=live, other=0)
    idx = c.to(tl.int64) * chunk
    for _ in range(0, chunk):
        valid = live & (idx < n)
        entry = tl.load(table_ptr + _window(stream_ptr, pos, nbytes, valid, max_len),
                        mask=valid, other=0)
        tl.store(out_ptr + idx, entry >> 5, mask=valid)
        pos += entry & 31
        idx += 1


@triton.jit
def _hptq_matmul(x_ptr, stream_ptr, offsets_ptr, table_ptr, scale_ptr, y_ptr, M, N, K,
                 n_chunks, nbytes, chunk, max_len, scale_stride, BLOCK_C: tl.constexpr,
                 BLOCK_M: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    live = c < n_chunks
    m_ok = (m < M)[None, :]
    pos = tl.load(offsets_ptr + c, mask=live, other=0)
    idx = c.to(tl.int64) * chunk
    row = idx // K
    col = idx - row * K
    acc = tl.zeros((BLOCK_C, BLOCK_M), dtype=tl.float32)
    for _ in range(0, chunk):
        valid = live & (row < N)
        entry = tl.load(table_ptr + _window(stream_ptr, pos, nbytes, valid, max_len),
                        mask=valid, other=0)
        xv = tl.load(x_ptr + m[None, :] * K + col[:, None], mask=valid[:, None] & m_ok,
                     other=0.0).to(tl.float32)
        acc += (entry >> 5).to(tl.float32)[:, None] * xv
        pos += entry & 31
        col += 1
        ended = valid & (col == K)
        s = tl.load(scale_ptr + row * scale_stride, mask=ended, other=0.0).to(tl.float32)
        tl.atomic_add(y_ptr + m[None, :] * N + row[:, None], acc * s[:, None],
                      mask=ended[:, None] & m_ok)
        acc = tl.where(ended[:, None], 0.0, acc)
        row = tl.where(ended, row + 1, row)
        col = tl.where(ended, 0, col)
    rest = live & (row < N) & (col > 0)
    s = tl.load(scale_ptr + row * scale_stride, mask=rest, other=0.0).to(tl.float32)
    tl.atomic_add(y_ptr + m[None, :] * N + row[:, None], acc * s[:, None],
                  mask=rest[:, None] & m_ok)


BLOCK_C = 16 if INTERPRET else 128


def huffman_decode(bitstream: torch.Tensor, offsets: torch.Tensor, table: torch.Tensor,
                   n: int, chunk: int, max_len: int) -> torch.Tensor:
    """The ``n`` int32 codes of a stream (on the stream's device)."""
    out = torch.empty(n, dtype=torch.int32, device=bitstream.device)
    if n:
        grid = (triton.cdiv(offsets.numel(), BLOCK_C),)
        wrap_triton(_huffman_decode)[grid](bitstream, offsets, table, out, n, offsets.numel(),
                                           bitstream.numel(), chunk, max_len, BLOCK_C=BLOCK_C)
    return out


def hptq_matmul(x: torch.Tensor, bitstream: torch.Tensor, offsets: torch.Tensor,
                table: torch.Tensor, scale: torch.Tensor, out_features: int, chunk: int,
                max_len: int) -> torch.Tensor:
    """fp32 ``x [M, K] @ (s·Q)ᵀ`` → [M, N] with ``Q`` decoded inside the kernel."""
    m, k = x.shape
    y = torch.zeros((m, out_features), dtype=torch.float32, device=x.device)
    if m and out_features:
        block_m = max(1, min(16, triton.next_power_of_2(m)))
        grid = (triton.cdiv(offsets.numel(), BLOCK_C), triton.cdiv(m, block_m))
        wrap_triton(_hptq_matmul)[grid](
            x.contiguous(), bitstream, offsets, table, scale, y, m, out_features, k,
            offsets.numel(), bitstream.numel(), chunk, max_len,
            0 if scale.numel() == 1 else 1, BLOCK_C=BLOCK_C, BLOCK_M=block_m)
    return y
