"""Canonical Huffman coding of integer symbols, chunk-indexed for parallel decoding.

Code lengths come from the classic two-queue Huffman construction over the distinct
symbols' counts, then are limited to ``max_len`` bits (default 16, raised to
``ceil(log2 #symbols)`` when there are more symbols than 2^16): lengths above the limit are
cut to it and the Kraft sum ``Σ 2^(L−l)`` is brought back to ``≤ 2^L`` by lengthening the
longest codes shorter than ``L`` (rarest first). This heuristic is not optimal (package-merge
is) but costs well under 1 % on real weight codes, where the limit rarely binds. One distinct
symbol gets length 0: its stream is empty and the count alone decodes it.

Canonical codes: symbols sorted by (length, value); code ``i`` is the Kraft partial sum
``Σ_{j<i} 2^(L−l_j)`` shifted right by ``L − l_i``. Bits are written MSB first.

Stored format (``HuffmanStream``), every part a tensor, so its byte count is exact:

- ``bitstream`` uint8 [ceil(total_bits/8)] — the codes back to back, zero-padded;
- ``symbols`` int32 [S] in canonical order and ``lengths`` uint8 [S] — the codebook;
- ``offsets`` int32 [ceil(n/chunk)] — bit offset of symbol ``c·chunk`` (the chunk index);
- ``header`` int64 [3] — ``(n, chunk, L)``.

Decoding reads ``L`` bits at each chunk's cursor and looks them up in a ``2^L`` table of
(symbol, length), for all chunks at once: ``chunk`` vector steps, not ``n`` scalar ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from babai_ao.errors import BabaiError

DEFAULT_MAX_LEN = 16
MAX_LEN_LIMIT = 24  # a 32-bit window at any bit offset holds a whole code (24 + 7 ≤ 32)
DEFAULT_CHUNK = 1024


def huffman_lengths(counts: np.ndarray) -> np.ndarray:
    """Optimal (unlimited) Huffman code lengths for positive ``counts`` [S]."""
    counts = np.asarray(counts, dtype=np.int64)
    s = counts.size
    if s == 0:
        return np.zeros(0, dtype=np.int64)
    if (counts <= 0).any():
        raise BabaiError("Huffman counts must be positive: drop symbols that never occur")
    if s == 1:
        return np.zeros(1, dtype=np.int64)
    order = np.argsort(counts, kind="stable")
    weight = np.concatenate([counts[order], np.zeros(s - 1, dtype=np.int64)]).tolist()
    parent = [0] * (2 * s - 1)
    leaf, node = 0, s  # next unmerged leaf; next unmerged internal node
    for new in range(s, 2 * s - 1):  # two queues: leaves by count, internals in creation order
        picks = []
        for _ in range(2):
            if leaf < s and (node >= new or weight[leaf] <= weight[node]):
                picks.append(leaf)
                leaf += 1
            else:
                picks.append(node)
                node += 1
        weight[new] = weight[picks[0]] + weight[picks[1]]
        parent[picks[0]] = parent[picks[1]] = new
    depth = [0] * (2 * s - 1)
    for i in range(2 * s - 3, -1, -1):  # the root (2s−2) has depth 0; parents come later
        depth[i] = depth[parent[i]] + 1
    lengths = np.empty(s, dtype=np.int64)
    lengths[order] = depth[:s]
    return lengths


def limit_lengths(lengths: np.ndarray, counts: np.ndarray, max_len: int) -> np.ndarray:
    """Lengths ``≤ max_len`` with Kraft sum ``≤ 1`` (see module docstring for the rule)."""
    lengths = np.minimum(np.asarray(lengths, dtype=np.int64), max_len)
    if lengths.size > 2**max_len:
        raise BabaiError(f"{lengths.size} symbols do not fit codes of ≤ {max_len} bits: "
                         f"raise max_len to ≥ {math.ceil(math.log2(lengths.size))}")
    kraft = int((1 << (max_len - lengths)).sum())
    rank = np.lexsort((np.asarray(counts), -lengths))  # longest first, rarest first within
    while kraft > 2**max_len:
        for i in rank:
            if lengths[i] < max_len:
                kraft -= 1 << (max_len - lengths[i] - 1)
                lengths[i] += 1
                break
        rank = np.lexsort((np.asarray(counts), -lengths))
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code values for ``lengths`` already sorted ascending (ties in symbol order)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        return np.zeros(0, dtype=np.int64)
    top = int(lengths.max())
    span = np.left_shift(1, top - lengths)
    start = np.concatenate([[0], np.cumsum(span)[:-1]])
    return start >> (top - lengths)


@dataclass
class HuffmanStream:
    """A canonical-Huffman-coded integer sequence with a chunk index (see module docstring)."""

    bitstream: torch.Tensor  # uint8
    symbols: torch.Tensor  # int32, canonical order
    lengths: torch.Tensor  # uint8
    offsets: torch.Tensor  # int32, bit offset of every chunk
    header: torch.Tensor  # int64 [3]: n, chunk, max code length

    @property
    def num_symbols(self) -> int:
        return int(self.header[0])

    @property
    def chunk(self) -> int:
        return int(self.header[1])

    @property
    def max_len(self) -> int:
        return int(self.header[2])

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {prefix + name: getattr(self, name) for name in FIELDS}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "") -> HuffmanStream:
        return cls(**{name: tensors[prefix + name] for name in FIELDS})

    @property
    def nbytes(self) -> int:
        """Every stored byte: bitstream + codebook + chunk index + header."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


FIELDS = ("bitstream", "symbols", "lengths", "offsets", "header")


def stream_problem(stream: HuffmanStream) -> str | None:
    """What makes ``stream`` not one :func:`encode` writes, if anything (cheap checks of the
    codebook and chunk index, no decoding): ``None`` when it is consistent."""
    n, chunk, top = (int(v) for v in stream.header.tolist())
    lengths = stream.lengths.long()
    symbols = stream.symbols.long()
    offsets = stream.offsets.long()
    if n < 0 or chunk < 1 or not 0 <= top <= MAX_LEN_LIMIT:
        return f"a Huffman header (n, chunk, max_len) = {(n, chunk, top)} out of range"
    if symbols.numel() != lengths.numel() or (n > 0) != (symbols.numel() > 0):
        return f"a Huffman codebook of {symbols.numel()} symbols, {lengths.numel()} lengths"
    if lengths.numel() > 1:
        if int(lengths.min()) < 1 or int(lengths.max()) != top:
            return f"Huffman code lengths outside [1, {top}]"
        key = lengths * 2**33 + symbols  # canonical order: by length, then symbol
        if bool((key[1:] <= key[:-1]).any()):
            return "a Huffman codebook not in canonical order"
        if int((2 ** (top - lengths)).sum()) > 2**top:
            return "Huffman code lengths that break the Kraft inequality"
    elif lengths.numel() == 1 and (int(lengths[0]) != 0 or top != 0):
        return "a one-symbol Huffman codebook with a non-empty code"
    if offsets.numel() != -(-n // chunk):
        return f"a Huffman chunk index of {offsets.numel()} entries for {n} symbols"
    if offsets.numel() and (int(offsets[0]) != 0 or bool((offsets[1:] < offsets[:-1]).any())
                            or int(offsets[-1]) > 8 * stream.bitstream.numel()):
        return "a Huffman chunk index that does not point into the stream"
    return None


def encoded_bits(values: torch.Tensor | np.ndarray, max_len: int | None = None) -> int:
    """Length of the bitstream ``encode`` would write, in bits (no codebook/index)."""
    _, counts = value_counts(_as_int_array(values))
    lengths = _lengths(counts, max_len)
    return int((lengths * counts).sum())


def _as_int_array(values: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if arr.dtype.kind not in "iu":
        raise BabaiError(f"Huffman coding takes integer symbols, got dtype {arr.dtype}: "
                         "round and cast the codes to an integer dtype first")
    arr = arr.reshape(-1).astype(np.int64)
    if arr.size and (arr.min() < -(2**31) or arr.max() >= 2**31):
        raise BabaiError("Huffman symbols must fit int32: the codes are out of range "
                         "(use a coarser scale)")
    return arr


def value_counts(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(arr, return_counts=True)`` in O(n): by ``bincount`` over ``[min, max]``
    when that range is no longer than the array (quantization codes always: a few hundred
    values), else by sorting. The same sorted values and counts."""
    if arr.size == 0 or int(arr.max()) - int(arr.min()) >= max(arr.size, 1 << 16):
        return np.unique(arr, return_counts=True)
    lo = int(arr.min())
    bins = np.bincount(arr - lo)
    present = np.flatnonzero(bins)
    return present + lo, bins[present]


def _lengths(counts: np.ndarray, max_len: int | None) -> np.ndarray:
    limit = DEFAULT_MAX_LEN if max_len is None else int(max_len)
    if counts.size > 1:
        limit = max(limit, math.ceil(math.log2(counts.size))) if max_len is None else limit
    if not 1 <= limit <= MAX_LEN_LIMIT:
        raise BabaiError(f"max_len={limit} is out of range: choose 1..{MAX_LEN_LIMIT}")
    return limit_lengths(huffman_lengths(counts), counts, limit)


ENCODE_PIECE = 1 << 22  # symbols coded at a time: bounds encode's per-symbol temporaries


def encode(values: torch.Tensor | np.ndarray, chunk: int = DEFAULT_CHUNK,
           max_len: int | None = None) -> HuffmanStream:
    """Canonical-Huffman-code the integers ``values`` (flattened) with a chunk index.

    The symbols are coded ``ENCODE_PIECE`` (rounded to whole chunks) at a time into one bit
    array, so the per-symbol temporaries (lengths, codes, bit positions) stay bounded: a
    262 M-weight output head no longer needs ~14 GB."""
    if chunk <= 0:
        raise BabaiError(f"chunk={chunk} must be positive (e.g. {DEFAULT_CHUNK})")
    arr = _as_int_array(values)
    uniq, counts = value_counts(arr)
    lengths = _lengths(counts, max_len)
    order = np.lexsort((uniq, lengths))  # canonical order: by length, then value
    codes = np.empty_like(lengths)
    codes[order] = canonical_codes(lengths[order])
    top = int(lengths.max()) if lengths.size else 0
    total = int((lengths * counts).sum())
    if total >= 2**31:
        raise BabaiError(f"{total} bits exceed the int32 chunk index: split the tensor")
    stream = np.zeros(total, dtype=np.uint8)
    piece = chunk * max(1, ENCODE_PIECE // chunk)  # whole chunks: the index is every chunk-th
    offsets, pos = [], 0
    for p0 in range(0, arr.size, piece):
        symbol = np.searchsorted(uniq, arr[p0:p0 + piece])
        sym_len, sym_code = lengths[symbol], codes[symbol]
        starts = np.cumsum(sym_len) - sym_len + pos
        for b in range(top):  # bit b (from the MSB) of every code at least b + 1 bits long
            sel = sym_len > b
            stream[starts[sel] + b] = (sym_code[sel] >> (sym_len[sel] - 1 - b)) & 1
        offsets.append(starts[::chunk])
        pos = int(starts[-1] + sym_len[-1])
    offsets = np.concatenate(offsets) if offsets else np.zeros(0, dtype=np.int64)
    return HuffmanStream(
        bitstream=torch.from_numpy(np.packbits(stream)),
        symbols=torch.from_numpy(uniq[order].astype(np.int32)),
        lengths=torch.from_numpy(lengths[order].astype(np.uint8)),
        offsets=torch.from_numpy(offsets.astype(np.int32)),
        header=torch.tensor([arr.size, chunk, top], dtype=torch.int64),
    )


def decode(stream: HuffmanStream) -> torch.Tensor:
    """The int64 sequence ``stream`` encodes; all chunks decoded in lockstep."""
    n, chunk, top = stream.num_symbols, stream.chunk, stream.max_len
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    symbols = stream.symbols.numpy().astype(np.int64)
    lengths = stream.lengths.numpy().astype(np.int64)
    # Table over all top-bit windows: canonical codes of one length fill a contiguous run.
    table_sym = np.repeat(np.arange(symbols.size), 1 << (top - lengths))
    table_len = lengths[table_sym]
    fill = (1 << top) - table_sym.size  # unused windows (Kraft sum < 1) never occur
    table_sym = np.concatenate([table_sym, np.zeros(fill, dtype=np.int64)])
    table_len = np.concatenate([table_len, np.zeros(fill, dtype=np.int64)])
    data = np.concatenate([stream.bitstream.numpy(), np.zeros(4, dtype=np.uint8)]).astype(
        np.uint64)
    # words[b]: the 32 bits starting at byte b, big-endian
    words = (data[:-3] << 24) | (data[1:-2] << 16) | (data[2:-1] << 8) | data[3:]
    last = words.size - 1
    pos = stream.offsets.numpy().astype(np.int64)
    out = np.empty((pos.size, chunk), dtype=np.int64)
    mask = np.uint64((1 << top) - 1)
    for t in range(min(chunk, n)):  # step t decodes symbol t of every chunk
        w = words[np.minimum(pos >> 3, last)]
        idx = ((w >> (32 - top - (pos & 7)).astype(np.uint64)) & mask).astype(np.int64)
        out[:, t] = table_sym[idx]
        pos = pos + table_len[idx]
    return torch.from_numpy(symbols[out.reshape(-1)[:n]])


def encoded_nbytes(values: torch.Tensor | np.ndarray, chunk: int = DEFAULT_CHUNK,
                   max_len: int | None = None) -> int:
    """``encode(values, chunk, max_len).nbytes``, computed without writing the stream."""
    arr = _as_int_array(values)
    _, counts = value_counts(arr)
    total = int((_lengths(counts, max_len) * counts).sum())
    n_chunks = -(-arr.size // chunk)
    return (total + 7) // 8 + counts.size * (4 + 1) + 4 * n_chunks + 8 * 3
