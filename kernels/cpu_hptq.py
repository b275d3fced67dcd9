"""HPTQ on CPU at 4-bit speed: torch's int4pack kernel for the codes near each group's mode,
plus a sparse correction for the rest.

An HPTQ weight is ``W = s_n · C`` with integer codes ``C`` [N, K] of any size and one scale
(``s_n = s``) or one per row. At the rates HPTQ is used (≈ 2.3–4.3 stored bits) the codes are
concentrated: on SmolLM2-135M at 3.3 bits, 99.9 % of each group of 64 codes lie in one window
of 16 consecutive integers (BENCHMARKS.md, "HPTQ at 4-bit speed"). So for each row ``n`` and
group ``g`` of ``group`` columns we pick the offset ``o[n, g]`` whose window
``[o − 8, o + 7]`` holds the most codes (``window_offsets``) and split

    C = C₄ + Δ,   C₄ = clamp(C, o − 8, o + 7),   Δ = C − C₄  (nonzero only off the window).

``C₄`` goes to ``_weight_int4pack_mm_for_cpu`` as nibbles ``q = C₄ − o + 8 ∈ [0, 15]`` with
the kernel's per-group affine map ``(q − 8)·a + c`` at ``a = 1``, ``c = o`` — integers the
kernel reconstructs exactly (``|o| ≤ MAX_OFFSET``, so every weight it forms is an integer of
magnitude ≤ 256, exact in bf16 and fp32).

The off-window codes crowd into few rows (on SmolLM2-135M at 3.3 bits the longest row of a
layer holds 2–390 of them while most hold 0–3), and a sparse entry costs far more than a
weight of the kernel (a gather, a product and an add into the output: ≈ ``ENTRY_COST``
weights). So the ``H`` rows holding the most (``heavy_rows``: ``H`` ∈ {0, 16, 32, 64, …}
minimizing ``H·K + ENTRY_COST·(entries left + H)``) get a second int4pack row each, appended
after the ``N`` window rows: there ``C − o = lo + 16·r`` with ``lo, r ∈ [−8, 7]``, the window
row holds ``lo`` and the hi row ``r`` at scale 16, zero 0 (``split_heavy``), so the two rows'
integer weights sum to the codes exactly. What is left of ``Δ`` (the light rows' entries)
is stored as COO (int32 rows and columns, fp32 values, in row order, zero-padded:
``padded_length``). The layer computes, in fp32 after the kernel's bf16 output
``out = bf16(x·[C₄; Hi]ᵀ)`` [M, N + H],

    y = s_n · ( out[:, :N] + Σ_j out[:, N + j]·e_{hi_rows[j]} + x·Δᵀ ) + b,

the two sums as ``index_add`` scatters in pieces of at most ``CHUNK`` = 512 entries: inductor
runs a loop on all threads once it has ≥ 512·threads iterations, and two threads adding
atomically into one output vector of a few hundred floats cost far more than the adds
(BENCHMARKS.md, "HPTQ at 4-bit speed: hi rows + serial scatter"). The weight is exact (no
scale is rounded to bf16, unlike the plain 4-bit path, whose ``a``, ``c`` are bf16); the
roundings are the kernel's fp32-accumulated bf16 outputs (one per window row and hi row;
a heavy row's output is the sum of two) and the final cast to the activation dtype.
Like ``Int4PackLinear`` it computes in bf16 (fp32 activations are cast).

``build_layout(codes, scales)`` builds the layout and :func:`linear` computes with it:
an HPTQ weight (``HuffmanQuantizedTensor``) keeps that layout on itself and its ``F.linear``
on CPU runs it by default (``babai_ao.ao.hptq_tensor``; ``cpu_kernel("exact")`` turns it
off). ``prepare_hptq_cpu(codes, scales, bias)`` builds the layer and returns ``None`` where the
layout does not pay (more than ``MAX_SPARSE_FRACTION`` of the weights off their windows) or
cannot be built (``N % 16 ≠ 0``, no group size dividing ``K``); ``prepare_cpu`` then keeps the int8
path. The prepared module holds only the kernel's layout: save the model before preparing.
``BABAI_CPU_HPTQ_INT4=0`` turns this form off (HPTQ layers then take the int8 path).
"""

from __future__ import annotations

import os

import torch
from torch import nn

GROUP_SIZES = (256, 128, 64, 32)  # int4pack's groups, largest first
WINDOW = 16  # 4-bit codes: 16 consecutive integers per group
MAX_OFFSET = 248  # |o| + 8 ≤ 256: every integer the kernel forms is exact in bf16
MAX_SPARSE_FRACTION = 0.03  # off-window codes / weights above this: keep the int8 path
ENTRY_COST = 256  # one sparse entry (serial atomic add) ≈ this many int4pack weights
CHUNK = 512  # sparse entries per scatter: below inductor's parallel threshold (512·threads)
HI_ROW_COUNTS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
ENABLED = os.environ.get("BABAI_CPU_HPTQ_INT4", "1") != "0"


def group_size_for(in_features: int) -> int | None:
    """The largest int4pack group size dividing ``K`` (fewer per-group scale/zero pairs to
    read), or ``None``."""
    return next((g for g in GROUP_SIZES if in_features % g == 0), None)


def window_offsets(codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """``o`` [N, G] (int64): the window ``[o − 8, o + 7]`` holding the most codes of each
    group of ``group_size`` columns among those with ``|o| ≤ MAX_OFFSET`` (the lowest on ties).

    Sliding a window up until its lower end meets a code (or the largest allowed start)
    never loses a code, so the best start is one of the group's codes clamped to the allowed
    starts; with the group sorted, the window starting at ``t`` holds
    ``#{c ≤ t + 15} − #{c < t}`` codes.
    """
    n, k = codes.shape
    s = codes.reshape(n * (k // group_size), group_size).sort(dim=1).values
    starts = s.clamp(-MAX_OFFSET - WINDOW // 2, MAX_OFFSET - WINDOW // 2)
    held = (torch.searchsorted(s, starts + (WINDOW - 1), right=True)
            - torch.searchsorted(s, starts))
    best = starts.gather(1, held.argmax(dim=1, keepdim=True)).squeeze(1)
    return (best + WINDOW // 2).reshape(n, k // group_size)


def split_codes(codes: torch.Tensor, offsets: torch.Tensor, group_size: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, Δ)``: nibbles ``q = clamp(C − o + 8, 0, 15)`` and ``Δ = C − (q − 8 + o)``, both
    int64 [N, K], for codes ``C`` and per-group offsets ``o`` [N, G]."""
    o = offsets.repeat_interleave(group_size, dim=1)
    q = (codes - o + WINDOW // 2).clamp(0, WINDOW - 1)
    return q, codes - (q - WINDOW // 2 + o)


def heavy_rows(counts: torch.Tensor, in_features: int) -> int:
    """How many of the rows holding the most off-window codes get a hi row: the count in
    ``HI_ROW_COUNTS`` (at most ``N``) minimizing ``H·K + ENTRY_COST·(entries left)``, the
    int4pack weights the hi rows add against the sparse entries they remove. A few fixed
    counts keep the number of distinct shapes, hence compiled kernels, small."""
    counts = counts.sort(descending=True).values  # off-window codes per row
    total = int(counts.sum())
    best, best_cost = 0, float(total * ENTRY_COST)
    for h in HI_ROW_COUNTS:
        if h > counts.numel():
            break
        cost = h * in_features + ENTRY_COST * (total - int(counts[:h].sum()))
        if cost < best_cost:
            best, best_cost = h, cost
    return best


def split_heavy(codes: torch.Tensor, offsets: torch.Tensor, group_size: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, hi, Δ)`` of rows ``codes`` [H, K] (offsets [H, G]) moved to two nibbles: there
    ``C − o = lo + 16·r`` with ``lo ∈ [−8, 7]`` (``q = lo + 8``, the row's window nibble) and
    ``r ∈ [−8, 7]`` (``hi = r + 8``, a second int4pack row read with scale 16, zero 0), so the
    two rows' weights sum to ``C`` and ``Δ`` is 0 there; a code with ``r`` outside ``[−8, 7]``
    keeps its clamped window nibble and its ``Δ`` (:func:`split_codes`). All int64 [H, K]."""
    q, delta = split_codes(codes, offsets, group_size)
    v = codes - offsets.repeat_interleave(group_size, dim=1)
    lo = torch.remainder(v + WINDOW // 2, WINDOW) - WINDOW // 2
    r = torch.div(v - lo, WINDOW, rounding_mode="floor")
    fits = (r >= -WINDOW // 2) & (r < WINDOW // 2)
    return (torch.where(fits, lo + WINDOW // 2, q), torch.where(fits, r, 0) + WINDOW // 2,
            torch.where(fits, 0, delta))


def coo(rows: torch.Tensor, cols: torch.Tensor, val: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The nonzeros of ``Δ`` (``rows``, ``cols``, ``val``; any order) in row order: rows,
    columns (int32) and values (fp32, exact for |Δ| < 2²⁴), padded with (0, 0, 0.0) entries
    to a length :func:`padded_length`.

    The padding adds ``x[:, 0]·0`` to output 0. It is there for compile time: inductor bakes
    the entry count into each layer's C++ kernel, so unpadded every layer compiled its own
    kernel (a 30-block SmolLM2 took > 12 min to compile on the shared 2-core box instead of
    ≈ 2); padded, layers of one shape share a handful of kernels.
    """
    order = torch.sort(rows * (int(cols.max()) + 1 if cols.numel() else 1) + cols).indices
    rows, cols, val = rows[order], cols[order], val[order].to(torch.float32)
    pad = padded_length(int(val.numel())) - int(val.numel())
    zeros = torch.zeros(pad, dtype=torch.int64)
    return (torch.cat([rows, zeros]).to(torch.int32), torch.cat([cols, zeros]).to(torch.int32),
            torch.cat([val, torch.zeros(pad)]))


LAYOUT_CHUNK = 1 << 22  # weights per chunk of rows while a layout is built


def windows_in_chunks(codes: torch.Tensor, group_size: int
                      ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """``(offsets [N, G], nibbles q [N, K] uint8, (rows, cols, values) of Δ ≠ 0)``:
    :func:`window_offsets` and :func:`split_codes` on ``LAYOUT_CHUNK`` weights of rows at a
    time (rows are independent), so no N × K int64 array is formed (a 1B model's
    262 M-weight head needed > 14 GB)."""
    n, k = codes.shape
    step = max(1, LAYOUT_CHUNK // k)
    offsets, nibbles, entries = [], [], []
    for r in range(0, n, step):
        c = codes[r:r + step].to(torch.int64)
        o = window_offsets(c, group_size)
        q, d = split_codes(c, o, group_size)
        rr, cc = d.nonzero(as_tuple=True)
        offsets.append(o)
        nibbles.append(q.to(torch.uint8))
        entries.append((rr + r, cc, d[rr, cc]))
    return (torch.cat(offsets), torch.cat(nibbles),
            tuple(torch.cat(t) for t in zip(*entries)))


def padded_length(entries: int) -> int:
    """0, a power of two from 64 to ``CHUNK``, or the next multiple of ``CHUNK``."""
    if entries == 0:
        return 0
    if entries > CHUNK:
        return -(-entries // CHUNK) * CHUNK
    return max(64, 1 << (entries - 1).bit_length())


class Int4SparseLinear(nn.Module):
    """``y = s_n·(x @ C₄ᵀ + x @ Δᵀ) + b``: the int4pack kernel on the window rows (plus hi
    rows for the heaviest rows) and the sparse ``Δ`` (COO), computed in bf16 by the kernel
    and fp32 after it (:func:`linear`)."""

    def __init__(self, weight: torch.Tensor, scale_zero: torch.Tensor, scales: torch.Tensor,
                 hi_rows: torch.Tensor, sparse_rows: torch.Tensor, sparse_cols: torch.Tensor,
                 sparse_val: torch.Tensor, bias: torch.Tensor | None, group_size: int,
                 in_features: int):
        super().__init__()
        self.register_buffer("weight_int4pack", weight)  # [N + H, K/2]: window rows, hi rows
        self.register_buffer("scale_zero", scale_zero)  # [G, N + H, 2] bf16: (1, o), (16, 0)
        self.register_buffer("scales", scales)  # fp32 [1] or [N]
        self.register_buffer("hi_rows", hi_rows)  # int32 [H]: the row each hi row adds to
        self.register_buffer("sparse_rows", sparse_rows)  # int32 [nnz]
        self.register_buffer("sparse_cols", sparse_cols)  # int32 [nnz]
        self.register_buffer("sparse_val", sparse_val)  # fp32 [nnz]
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.group_size, self.in_features = group_size, in_features
        self.out_features = weight.shape[0] - hi_rows.numel()
        self.sparse_count = int((sparse_val != 0).sum())  # nonzeros of Δ, padding excluded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight_int4pack, self.scale_zero, self.scales, self.hi_rows,
                      self.sparse_rows, self.sparse_cols, self.sparse_val, self.bias,
                      self.group_size, self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, int4pack + {self.hi_rows.numel()} hi rows + "
                f"{self.sparse_count} sparse (bf16 compute)")


def build_layout(codes: torch.Tensor, scales: torch.Tensor,
                 max_sparse_fraction: float | None = None,
                 heavy: int | None = None) -> tuple[torch.Tensor, ...] | None:
    """``(int4pack weight, scale_zero, scales, hi_rows, rows, cols, val)`` for
    ``W = s_n · C`` (integer ``codes`` C [N, K], ``scales`` [1] or [N]), or ``None`` when it
    cannot be built (``N % 16 ≠ 0``, no group size dividing ``K``) or more than
    ``max_sparse_fraction`` (default ``MAX_SPARSE_FRACTION``) of the weights are off their
    windows (then the int8 path is faster), or the form is turned off (``ENABLED``). The
    group size is ``K // scale_zero.shape[0]``; ``heavy`` overrides :func:`heavy_rows` (how
    many rows get a hi row)."""
    n, k = codes.shape
    group = group_size_for(k)
    if not ENABLED or group is None or n % 16:
        return None
    if max_sparse_fraction is None:
        max_sparse_fraction = MAX_SPARSE_FRACTION
    offsets, q, (e_rows, e_cols, e_val) = windows_in_chunks(codes, group)
    if e_val.numel() > max_sparse_fraction * n * k:
        return None
    counts = torch.bincount(e_rows, minlength=n)
    h = heavy_rows(counts, k) if heavy is None else heavy
    rows = counts.sort(descending=True, stable=True).indices[:h]
    q_h, hi, d_h = split_heavy(codes[rows].to(torch.int64), offsets[rows], group)
    q[rows] = q_h.to(torch.uint8)
    light = ~torch.isin(e_rows, rows)  # entries of the other rows, then the hi rows' rest
    h_rows, h_cols = d_h.nonzero(as_tuple=True)
    sparse = coo(torch.cat([e_rows[light], rows[h_rows]]), torch.cat([e_cols[light], h_cols]),
                 torch.cat([e_val[light], d_h[h_rows, h_cols]]))
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        torch.cat([q.to(torch.int32), hi.to(torch.int32)]), 1)
    g = k // group
    scale_zero = torch.cat([torch.stack([torch.ones(n, g), offsets.to(torch.float32)], -1),
                            torch.stack([torch.full((h, g), float(WINDOW)),
                                         torch.zeros(h, g)], -1)])
    return (weight, scale_zero.transpose(0, 1).contiguous().to(torch.bfloat16),
            scales.reshape(-1).to(torch.float32), rows.to(torch.int32), *sparse)


def linear(x: torch.Tensor, weight: torch.Tensor, scale_zero: torch.Tensor,
           scales: torch.Tensor, hi_rows: torch.Tensor, rows: torch.Tensor,
           cols: torch.Tensor, val: torch.Tensor, bias: torch.Tensor | None,
           group_size: int, in_features: int) -> torch.Tensor:
    """``y = s_n·(bf16(x·C₄ᵀ) + bf16(x·Hiᵀ) + x·Δᵀ) + b`` in ``x.dtype`` (``x`` rounded to
    bf16; fp32 after the kernel; the hi rows' outputs added to their rows), aten ops only,
    so a compiled graph calls the kernel itself. The scatters run in pieces of at most
    ``CHUNK`` entries: inductor runs a loop of ≥ 512·threads iterations on all threads, and
    atomic adds from two threads into one small output vector cost far more than the adds."""
    n = weight.shape[0] - hi_rows.numel()
    x2 = x.reshape(-1, in_features).to(torch.bfloat16)
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, weight, group_size, scale_zero)
    y = out[:, :n].float()
    if hi_rows.numel():  # y[:, hi_rows[j]] += out[:, n + j]: distinct rows, a plain store
        y[:, hi_rows] = y[:, hi_rows] + out[:, n:].float()
    if val.numel():  # y[:, n] += x[:, k]·Δ[n, k] over the entries
        xf = x2.float()
        for i in range(0, val.numel(), CHUNK):
            c = slice(i, i + CHUNK)
            y = y.index_add(1, rows[c], xf[:, cols[c]] * val[c])
    y = y * scales
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def prepare_hptq_cpu(codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                     max_sparse_fraction: float | None = None, heavy: int | None = None
                     ) -> Int4SparseLinear | None:
    """The int4pack + sparse layer for ``W = s_n · C`` (:func:`build_layout`; ``None``
    where that declines)."""
    built = build_layout(codes, scales, max_sparse_fraction, heavy)
    if built is None:
        return None
    k = codes.shape[1]
    return Int4SparseLinear(*built, bias, k // built[1].shape[0], k)
