"""HPTQ on CPU at 4-bit speed: each group's 16-code window as nibbles, a sparse correction for
the rest, in one C++ kernel (``csrc/hptq_linear.cpp``, op ``babai_cpu::hptq_linear``).

An HPTQ weight is ``W = s_n · C`` with integer codes ``C`` [N, K] of any size and one scale
(``s_n = s``) or one per row. At the rates HPTQ is used (≈ 2.3–4.3 stored bits) the codes are
concentrated: on SmolLM2-135M at 3.3 bits, 99.9 % of each group of 64 codes lie in one window
of 16 consecutive integers (BENCHMARKS.md, "HPTQ at 4-bit speed"). So for each row ``n`` and
group ``g`` of ``group`` columns we pick the offset ``o[n, g]`` whose window
``[o − 8, o + 7]`` holds the most codes (``window_offsets``) and split

    C = C₄ + Δ,   C₄ = clamp(C, o − 8, o + 7),   Δ = C − C₄  (nonzero only off the window).

``C₄`` is stored as nibbles ``q = C₄ − o + 8 ∈ [0, 15]``; with ``S_g = Σ_{k∈g} x_k`` a row's
window part is ``x·C₄ᵀ = Σ_k x_k·q_k + Σ_g (o_g − 8)·S_g``, so the kernel's inner loop is one
fp32 FMA per weight on the nibble itself and the offsets cost one FMA per group.

The off-window codes crowd into few rows (on SmolLM2-135M at 3.3 bits the longest row of a
layer holds 2–390 of them while most hold 0–3). The ``H`` rows holding the most
(``heavy_rows``: ``H`` minimizing the kernel's time on the blocks plus ``ENTRY_COST`` weights
per entry left) get a second nibble row each, after the ``N`` window rows: there
``C − o = lo + 16·r`` with ``lo, r ∈ [−8, 7]``, the window row holds ``lo`` and the hi row
``r`` (offset 0, read ×16; ``split_heavy``), so the two rows sum to the codes exactly. What is left of ``Δ`` is kept as
entries (int32 rows and columns, fp32 values, exact for |Δ| < 2²⁴). The layer computes, all
in fp32 (``x`` is not rounded),

    y = s_n · ( raw[:N] + Σ_j 16·raw[N + j]·e_{hi_rows[j]} + x·Δᵀ ) + b,   raw = x·[C₄; Hi]ᵀ,

and returns ``y`` in ``x``'s dtype. The kernel (``csrc/hptq_linear.cpp``) takes the rows in
blocks of 32 (``pack_blocks``: per block and column 16 bytes, row ``j`` in the low nibble and
row ``16 + j`` in the high one), spreads the blocks over torch's threads, keeps up to 4
activation rows per pass over a block's weights, and adds the hi rows, the entries, ``s_n``
and ``b`` after the blocks — one call per layer, which a compiled graph makes directly (the
op has a fake kernel). The whole layout is one aligned uint8 buffer (``pack_layout``: an
int64 header, then the parts), so a compiled graph guards one tensor per layer. Its only
roundings are fp32 sums: against the dequantized weight in fp64,
``|y − y*| ≤ c·ε·Σ_k |x_k|·(|q_k| + |o − 8|)·|s_n|`` (tests).

``build_layout(codes, scales)`` builds the layout and :func:`linear` computes with it:
an HPTQ weight (``HuffmanQuantizedTensor``) keeps that layout on itself and its ``F.linear``
on CPU runs it by default (``babai_ao.ao.hptq_tensor``; ``cpu_kernel("exact")`` turns it
off). ``prepare_hptq_cpu(codes, scales, bias)`` builds the layer and returns ``None`` where the
layout does not pay (more than ``MAX_SPARSE_FRACTION`` of the weights off their windows) or
cannot be built (no group size dividing ``K``, the C++ op not built:
``kernels.cpp_ops``); ``prepare_cpu`` then keeps the int8 path. The prepared module holds only
the kernel's layout: save the model before preparing. ``BABAI_CPU_HPTQ_INT4=0`` turns this
form off (HPTQ layers then take the int8 path).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from . import cpp_ops

GROUP_SIZES = (256, 128, 64, 32)  # one offset per row and group: largest first
WINDOW = 16  # 4-bit codes: 16 consecutive integers per group
MAX_OFFSET = 248  # |o − 8| fits int16 with room; windows farther out are not searched
MAX_SPARSE_FRACTION = 0.03  # off-window codes / weights above this: keep the int8 path
ENTRY_COST = 32  # one sparse entry (serial, after the blocks) ≈ this many nibble weights
ROW_BLOCK = 32  # rows per kernel block (csrc/hptq_linear.cpp)
ENABLED = os.environ.get("BABAI_CPU_HPTQ_INT4", "1") != "0"


def group_size_for(in_features: int) -> int | None:
    """The largest of ``GROUP_SIZES`` dividing ``K`` (fewer offsets to store and read), or
    ``None``."""
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


def heavy_rows(counts: torch.Tensor, in_features: int, threads: int | None = None) -> int:
    """How many of the rows holding the most off-window codes get a hi row: the ``H``
    minimizing the layer's wall time in weight units,

        cost(H) = ⌈(N + H)/(32·T)⌉·32·T·K + ENTRY_COST·(entries left after the top H rows),

    the kernel's time on ``T`` threads (``threads``, default ``torch.get_num_threads()``: each
    thread runs whole 32-row blocks, so the slowest thread has ⌈blocks/T⌉ of them) against
    the serial sparse entries. Within one block count more rows cost nothing, so the
    candidates are 0 and every ``H`` that fills the last 32·T rows."""
    t = max(1, threads or torch.get_num_threads())
    step = ROW_BLOCK * t
    n = counts.numel()
    kept = torch.cat([torch.zeros(1, dtype=torch.int64),
                      counts.sort(descending=True).values.cumsum(0)])  # entries in top h
    total = int(kept[-1])

    def cost(h: int) -> int:
        return -(-(n + h) // step) * step * in_features + ENTRY_COST * (total - int(kept[h]))

    first = -n % step or step
    return min([0, *range(first, n + 1, step)], key=lambda h: (cost(h), h))


def split_heavy(codes: torch.Tensor, offsets: torch.Tensor, group_size: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, hi, Δ)`` of rows ``codes`` [H, K] (offsets [H, G]) moved to two nibbles: there
    ``C − o = lo + 16·r`` with ``lo ∈ [−8, 7]`` (``q = lo + 8``, the row's window nibble) and
    ``r ∈ [−8, 7]`` (``hi = r + 8``, a second nibble row with offset 0, read ×16), so the
    two rows' weights sum to ``C`` and ``Δ`` is 0 there; a code with ``r`` outside ``[−8, 7]``
    keeps its clamped window nibble and its ``Δ`` (:func:`split_codes`). All int64 [H, K]."""
    q, delta = split_codes(codes, offsets, group_size)
    v = codes - offsets.repeat_interleave(group_size, dim=1)
    lo = torch.remainder(v + WINDOW // 2, WINDOW) - WINDOW // 2
    r = torch.div(v - lo, WINDOW, rounding_mode="floor")
    fits = (r >= -WINDOW // 2) & (r < WINDOW // 2)
    return (torch.where(fits, lo + WINDOW // 2, q), torch.where(fits, r, 0) + WINDOW // 2,
            torch.where(fits, 0, delta))


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


def pack_blocks(nibbles: torch.Tensor) -> torch.Tensor:
    """uint8 [R/32, K, 16] from nibbles [R, K] (``R % 32 = 0``): block ``b``, column ``k``,
    byte ``j`` holds row ``32b + j`` in its low nibble and row ``32b + 16 + j`` in its high."""
    r, k = nibbles.shape
    b = nibbles.to(torch.uint8).reshape(r // ROW_BLOCK, 2, ROW_BLOCK // 2, k).permute(0, 3, 1, 2)
    return (b[:, :, 0] | (b[:, :, 1] << 4)).contiguous()


def block_offsets(offsets: torch.Tensor) -> torch.Tensor:
    """int16 [R/32, G, 32] from the rows' ``o − 8`` [R, G]: the kernel reads one block's 32
    rows of a group at once."""
    r, g = offsets.shape
    return offsets.to(torch.int16).reshape(r // ROW_BLOCK, ROW_BLOCK, g).transpose(1, 2).contiguous()


HEADER = ("magic", "row_blocks", "in_features", "groups", "hi_count", "entries",
          "scale_count", "out_features")  # int64 each, then the parts below, each at a multiple of ALIGN
MAGIC = 0x4250545148  # "HQTPB": this layout, version 1
ALIGN = 64
PARTS = (("blocks", torch.uint8), ("offsets", torch.int16), ("scales", torch.float32),
         ("hi_rows", torch.int32), ("rows", torch.int32), ("cols", torch.int32),
         ("val", torch.float32))


def _part_sizes(head: dict[str, int]) -> list[int]:
    nb, k, g, e = head["row_blocks"], head["in_features"], head["groups"], head["entries"]
    return [nb * k * 16, nb * g * ROW_BLOCK, head["scale_count"], head["hi_count"], e, e, e]


def pack_layout(blocks: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor,
                hi_rows: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                val: torch.Tensor, out_features: int) -> torch.Tensor:
    """One uint8 tensor holding the whole layout (header, then ``PARTS`` in that order and
    dtype, each starting at a multiple of ``ALIGN`` bytes): one buffer per layer keeps what a
    compiled graph guards and the op parses to a minimum (the kernel reads it in place and
    trusts the row and column indices, checked here)."""
    n, k = out_features, blocks.shape[1]
    inside = all(bool(((t >= 0) & (t < bound)).all()) for t, bound in (
        (hi_rows, n), (rows, n), (cols, k)))
    if not inside or blocks.shape[0] * ROW_BLOCK < n + hi_rows.numel():
        from babai_ao.errors import BabaiError

        raise BabaiError("HPTQ CPU layout: a row or column index is out of range (the "
                         "kernel trusts them): build the layout with build_layout")
    head = {"magic": MAGIC, "row_blocks": blocks.shape[0], "in_features": blocks.shape[1],
            "groups": offsets.shape[1], "hi_count": hi_rows.numel(), "entries": val.numel(),
            "scale_count": scales.numel(), "out_features": out_features}
    pieces = [torch.tensor([head[h] for h in HEADER], dtype=torch.int64).view(torch.uint8)]
    for (_, dtype), t in zip(PARTS, (blocks, offsets, scales, hi_rows, rows, cols, val)):
        pad = -sum(p.numel() for p in pieces) % ALIGN
        pieces += [torch.zeros(pad, dtype=torch.uint8),
                   t.to(dtype).contiguous().reshape(-1).view(torch.uint8)]
    return torch.cat(pieces)


def layout_parts(layout: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views of :func:`pack_layout`'s parts (``blocks`` [nb, K, 16], ``offsets`` [nb, G, 32],
    ``scales``, ``hi_rows``, ``rows``, ``cols``, ``val``) and its header's integers."""
    head = dict(zip(HEADER, layout[:8 * len(HEADER)].view(torch.int64).tolist()))
    if head["magic"] != MAGIC:
        from babai_ao.errors import BabaiError

        raise BabaiError("not an HPTQ CPU layout (wrong magic): rebuild it with build_layout")
    out: dict[str, torch.Tensor] = {}
    at = 8 * len(HEADER)
    for (name, dtype), count in zip(PARTS, _part_sizes(head)):
        at += -at % ALIGN
        nbytes = count * torch.empty(0, dtype=dtype).element_size()
        out[name] = layout[at:at + nbytes].view(dtype)
        at += nbytes
    nb, k, g = head["row_blocks"], head["in_features"], head["groups"]
    out["blocks"] = out["blocks"].reshape(nb, k, 16)
    out["offsets"] = out["offsets"].reshape(nb, g, ROW_BLOCK)
    return {**out, **{h: head[h] for h in HEADER[1:]}}


class Int4SparseLinear(nn.Module):
    """``y = s_n·(x @ C₄ᵀ + x @ Δᵀ) + b``: window nibbles (plus hi rows for the heaviest rows)
    and the sparse ``Δ``, in fp32 in one ``babai_cpu::hptq_linear`` call on one layout
    buffer (:func:`pack_layout`, :func:`linear`)."""

    def __init__(self, layout: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("layout", layout)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        parts = layout_parts(layout)
        self.out_features, self.in_features = parts["out_features"], parts["in_features"]
        self.group_size = self.in_features // parts["groups"]

    @property
    def parts(self) -> dict[str, torch.Tensor]:
        """The layout's parts as views (:func:`layout_parts`)."""
        return layout_parts(self.layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.layout, self.bias, self.out_features)

    def extra_repr(self) -> str:
        p = self.parts
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, 4-bit windows + {p['hi_count']} hi rows "
                f"+ {p['entries']} sparse (fp32 compute)")


def build_layout(codes: torch.Tensor, scales: torch.Tensor,
                 max_sparse_fraction: float | None = None,
                 heavy: int | None = None) -> tuple[torch.Tensor] | None:
    """``(layout,)`` — :func:`pack_layout` of the blocks, offsets, scales, hi rows and sparse
    entries (in row order) — for ``W = s_n · C`` (integer ``codes`` C [N, K], any ``N``: rows
    are padded to whole blocks; ``scales`` [1] or [N]), or ``None`` where it cannot be built
    (no group size dividing ``K``, the C++ op unavailable, the form turned off: ``ENABLED``)
    or does not pay (more than ``max_sparse_fraction``, default ``MAX_SPARSE_FRACTION``, of
    the weights off their windows: the int8 path is faster). ``heavy`` overrides
    :func:`heavy_rows` (how many rows get a hi row)."""
    n, k = codes.shape
    group = group_size_for(k)
    if not ENABLED or group is None or not cpp_ops.load():
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
    s_rows = torch.cat([e_rows[light], rows[h_rows]])
    s_cols = torch.cat([e_cols[light], h_cols])
    s_val = torch.cat([e_val[light], d_h[h_rows, h_cols]])
    order = torch.argsort(s_rows * k + s_cols)
    pad = -(n + h) % ROW_BLOCK  # zero rows up to a whole block
    nibbles = torch.cat([q, hi.to(torch.uint8), torch.zeros(pad, k, dtype=torch.uint8)])
    shift = torch.cat([offsets - WINDOW // 2,
                       torch.full((h, k // group), -(WINDOW // 2), dtype=offsets.dtype),
                       torch.zeros(pad, k // group, dtype=offsets.dtype)])
    return (pack_layout(pack_blocks(nibbles), block_offsets(shift), scales.reshape(-1),
                        rows, s_rows[order], s_cols[order], s_val[order], n),)


def linear(x: torch.Tensor, layout: torch.Tensor, bias: torch.Tensor | None,
           out_features: int) -> torch.Tensor:
    """``y = s_n·(x·C₄ᵀ + 16·(hi rows) + x·Δᵀ) + b`` in ``x.dtype``, computed in fp32 by
    ``babai_cpu::hptq_linear`` on :func:`pack_layout`'s buffer (module docstring) — one op
    call, also in a compiled graph."""
    return torch.ops.babai_cpu.hptq_linear(x, layout, bias, out_features)


def prepare_hptq_cpu(codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                     max_sparse_fraction: float | None = None, heavy: int | None = None
                     ) -> Int4SparseLinear | None:
    """The nibble + sparse layer for ``W = s_n · C`` (:func:`build_layout`; ``None`` where
    that declines)."""
    built = build_layout(codes, scales, max_sparse_fraction, heavy)
    if built is None:
        return None
    return Int4SparseLinear(built[0], bias)
