"""Canonical Huffman coding against independent references: a heap-built Huffman cost,
a bit-by-bit Python decoder, prefix-freeness, and the exact stored-byte formula."""

from __future__ import annotations

import heapq

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from babai_ao import BabaiError
from babai_ao.formats import huffman as hf


def heap_huffman_cost(counts: list[int]) -> int:
    """Σ count·length of an optimal prefix code = Σ of all merged weights (heap Huffman)."""
    if len(counts) <= 1:
        return 0
    heap = list(counts)
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        cost += a + b
        heapq.heappush(heap, a + b)
    return cost


def bitwise_decode(stream: hf.HuffmanStream) -> list[int]:
    """Reference decoder: walk the bits one at a time against the codebook dictionary."""
    syms = stream.symbols.tolist()
    lens = stream.lengths.tolist()
    codes = hf.canonical_codes(np.array(lens))
    book = {(int(c), int(ln)): s for s, c, ln in zip(syms, codes, lens)}
    bits = np.unpackbits(stream.bitstream.numpy()).tolist()
    out, cur, ln, i = [], 0, 0, 0
    while len(out) < stream.num_symbols:
        if (cur, ln) in book:
            out.append(book[(cur, ln)])
            cur, ln = 0, 0
            continue
        cur, ln, i = (cur << 1) | bits[i], ln + 1, i + 1
    return out


def check_stream(values: torch.Tensor, chunk: int = 64, max_len: int | None = None) -> hf.HuffmanStream:
    s = hf.encode(values, chunk, max_len)
    flat = values.reshape(-1).long()
    assert torch.equal(hf.decode(s), flat)
    lens = s.lengths.long()
    if lens.numel() > 1:
        assert int((2.0 ** -lens.double()).sum() * 2**30) <= 2**30  # Kraft
    # the exact byte formula, the tensors, and the size-only path agree
    n_chunks = -(-flat.numel() // chunk)
    assert s.nbytes == s.bitstream.numel() + 5 * s.symbols.numel() + 4 * n_chunks + 24
    assert s.nbytes == hf.encoded_nbytes(values, chunk, max_len)
    # chunk index: offset of chunk c = bits of the first c·chunk symbols
    length_of = dict(zip(s.symbols.tolist(), s.lengths.tolist()))
    per_symbol = torch.tensor([length_of[v] for v in flat.tolist()], dtype=torch.int64)
    starts = torch.cumsum(per_symbol, 0) - per_symbol
    assert torch.equal(s.offsets.long(), starts[::chunk])
    assert s.bitstream.numel() == (int(per_symbol.sum()) + 7) // 8
    return s


def test_one_symbol_costs_no_stream_bits():
    for n in (1, 1000):
        s = check_stream(torch.full((n,), -7))
        assert s.bitstream.numel() == 0 and s.max_len == 0
        assert bitwise_decode(s) == [-7] * n


def test_empty_input():
    s = check_stream(torch.zeros(0, dtype=torch.int64))
    assert s.num_symbols == 0 and hf.decode(s).numel() == 0


def test_two_symbols_one_bit_each():
    x = torch.tensor([5, -5, 5, 5, -5])
    s = check_stream(x, chunk=2)
    assert s.lengths.tolist() == [1, 1] and s.bitstream.numel() == 1


def test_all_distinct_symbols():
    x = torch.randperm(5000, generator=torch.Generator().manual_seed(0)) * 3 - 7000
    s = check_stream(x, chunk=1024)
    assert s.max_len == 13  # 5000 equiprobable symbols: lengths 12 and 13
    assert set(s.lengths.tolist()) == {12, 13}


def test_huge_range_codes():
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(-10**6, 10**6 + 1, (3000,), generator=gen)
    x[:10] = torch.tensor([-10**6, 10**6] * 5)
    check_stream(x, chunk=100)
    s = check_stream(torch.tensor([-10**6, 10**6, 0, 10**6]), chunk=3)
    assert bitwise_decode(s) == [-10**6, 10**6, 0, 10**6]


def test_unlimited_lengths_are_optimal():
    gen = np.random.default_rng(2)
    for size in (2, 3, 17, 300):
        counts = gen.integers(1, 1000, size)
        lengths = hf.huffman_lengths(counts)
        assert int((lengths * counts).sum()) == heap_huffman_cost(counts.tolist())


def test_length_limit_binds_on_fibonacci_counts():
    fib = [1, 1]
    while len(fib) < 30:
        fib.append(fib[-1] + fib[-2])
    counts = np.array(fib)
    assert hf.huffman_lengths(counts).max() == 29  # a path-shaped tree
    x = torch.from_numpy(np.repeat(np.arange(30), counts))
    x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(3))]
    s = check_stream(x, chunk=4096, max_len=12)
    assert s.max_len == 12
    # limited codes cost a little more than the optimum, never less
    opt = heap_huffman_cost(fib)
    assert opt <= hf.encoded_bits(x, max_len=12) <= 1.05 * opt


def test_decoder_matches_bitwise_reference_and_entropy():
    x = (torch.randn(20000, generator=torch.Generator().manual_seed(4)) * 4).round().long()
    s = check_stream(x, chunk=1024)
    assert bitwise_decode(s) == x.tolist()
    _, counts = np.unique(x.numpy(), return_counts=True)
    p = counts / counts.sum()
    entropy = float(-(p * np.log2(p)).sum()) * x.numel()
    assert entropy <= hf.encoded_bits(x) <= entropy + x.numel()  # within 1 bit/symbol


def test_codes_are_prefix_free():
    lens = np.array([2, 2, 3, 3, 3, 5, 5, 5, 5])
    codes = hf.canonical_codes(lens)
    words = [format(int(c), f"0{ln}b") for c, ln in zip(codes, lens)]
    for a in words:
        for b in words:
            assert a == b or not b.startswith(a)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.integers(-(2**31), 2**31 - 1) | st.integers(-3, 3), max_size=300),
       chunk=st.integers(1, 70))
def test_round_trip_property(values, chunk):
    check_stream(torch.tensor(values, dtype=torch.int64), chunk)


def test_bad_inputs_name_the_fix():
    with pytest.raises(BabaiError, match="integer"):
        hf.encode(torch.randn(4))
    with pytest.raises(BabaiError, match="int32"):
        hf.encode(torch.tensor([2**31]))
    with pytest.raises(BabaiError, match="chunk"):
        hf.encode(torch.tensor([1]), chunk=0)
    with pytest.raises(BabaiError, match="max_len"):
        hf.encode(torch.arange(100), max_len=5)


@pytest.mark.parametrize("spread", [0, 3, 200, 10**7])
def test_value_counts_equal_numpy_unique(spread):
    """The O(n) counting (bincount over [min, max]) gives np.unique's sorted values and
    counts; a range wider than the array falls back to sorting, with the same result."""
    from babai_ao.formats.huffman import value_counts

    rng = np.random.default_rng(spread)
    arr = (rng.standard_normal(5000) * spread).round().astype(np.int64) - 7
    values, counts = value_counts(arr)
    ref_values, ref_counts = np.unique(arr, return_counts=True)
    assert np.array_equal(values, ref_values) and np.array_equal(counts, ref_counts)
    assert counts.sum() == arr.size


@pytest.mark.parametrize("n,chunk", [(10_000, 64), (4097, 1024), (1, 1024), (3000, 7)])
def test_encode_in_pieces_is_the_one_pass_stream(monkeypatch, n, chunk):
    """Coding the symbols a piece (whole chunks) at a time writes exactly the stream, chunk
    index and codebook of one pass, and decodes back."""
    rng = np.random.default_rng(n + chunk)
    values = (rng.standard_normal(n) * 3).round().astype(np.int64)
    whole = hf.encode(values, chunk)
    monkeypatch.setattr(hf, "ENCODE_PIECE", 2 * chunk + 1)  # pieces of 2 chunks
    pieces = hf.encode(values, chunk)
    for name in ("bitstream", "symbols", "lengths", "offsets", "header"):
        assert torch.equal(getattr(pieces, name), getattr(whole, name)), name
    assert torch.equal(hf.decode(pieces), torch.from_numpy(values))
