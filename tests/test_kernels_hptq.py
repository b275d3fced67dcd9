"""HPTQ Triton kernels (under TRITON_INTERPRET=1 on CPU) against the NumPy Huffman decoder
and float math: the chunk-parallel decode, and the matmul that decodes inside the kernel."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # on a GPU the kernels run for real
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (conftest too)

import babai_ao.kernels  # noqa: E402,F401
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from _formats_util import random_problem  # noqa: E402
from babai_ao.kernels.huffman import decode_table, hptq_matmul, huffman_decode  # noqa: E402

from babai_ao import BabaiError  # noqa: E402
from babai_ao.ao.hptq_tensor import HuffmanQuantizedTensor  # noqa: E402
from babai_ao.formats import hptq, huffman  # noqa: E402


def _codes(kind: str, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "laplace":  # weight-like: few symbols, short codes
        u = torch.rand(n, generator=gen) - 0.5
        return (-3 * u.sign() * torch.log1p(-2 * u.abs())).round().long()
    if kind == "single":  # one symbol: zero-length codes, empty bitstream
        return torch.full((n,), -3, dtype=torch.long)
    return (torch.randn(n, generator=gen) * 300).round().long()  # ~1000 symbols, long codes


# rows, cols, chunk, kind, max_len (None: default limit)
STREAMS = [
    (24, 40, 16, "laplace", None),  # chunk < K: a chunk spans at most 2 rows
    (7, 13, 5, "single", None),
    (10, 64, 100, "wide", None),  # chunk > K: a chunk spans 3 rows
    (9, 33, 31, "laplace", 6),  # length limit binds; n not a multiple of the chunk
    (5, 48, 48, "wide", 12),  # chunk == K: rows end exactly at chunk ends
]


@pytest.mark.parametrize("rows,cols,chunk,kind,max_len", STREAMS)
def test_decode_kernel_recovers_the_codes(rows, cols, chunk, kind, max_len):
    codes = _codes(kind, rows * cols, seed=rows + cols)
    st = huffman.encode(codes, chunk=chunk, max_len=max_len)
    if max_len is not None:
        assert st.max_len <= max_len
    table = decode_table(st.symbols, st.lengths, st.max_len)
    out = huffman_decode(st.bitstream, st.offsets, table, st.num_symbols, st.chunk, st.max_len)
    assert out.dtype == torch.int32
    assert torch.equal(out.long(), codes)
    assert torch.equal(out.long(), huffman.decode(st))


def test_decode_table_maps_every_window_to_its_code():
    """Independent check of the table: re-encode each symbol's canonical code by brute force."""
    st = huffman.encode(_codes("laplace", 500, seed=1), chunk=64)
    table = decode_table(st.symbols, st.lengths, st.max_len).numpy()
    lengths = st.lengths.numpy().astype(np.int64)
    codes = huffman.canonical_codes(lengths)
    top = st.max_len
    for sym, length, code in zip(st.symbols.tolist(), lengths, codes):
        lo = int(code) << (top - length)
        for window in (lo, lo + (1 << (top - length)) - 1):  # first and last window of the run
            assert table[window] >> 5 == sym and table[window] & 31 == length


@pytest.mark.parametrize("rows,cols,chunk,kind,max_len", STREAMS)
@pytest.mark.parametrize("m,dtype,per_row", [(1, torch.float32, False),
                                             (3, torch.bfloat16, True),
                                             (17, torch.float16, False)])
def test_matmul_decoding_inside_the_kernel(rows, cols, chunk, kind, max_len, m, dtype, per_row):
    codes = _codes(kind, rows * cols, seed=rows * cols)
    st = huffman.encode(codes, chunk=chunk, max_len=max_len)
    gen = torch.Generator().manual_seed(m)
    scale = (torch.rand(rows if per_row else 1, generator=gen) * 0.01 + 0.001).half()
    x = torch.randn(m, cols, generator=gen).to(dtype)
    table = decode_table(st.symbols, st.lengths, st.max_len)
    y = hptq_matmul(x, st.bitstream, st.offsets, table, scale, rows, st.chunk, st.max_len)
    w = scale.float().reshape(-1, 1) * codes.reshape(rows, cols).float()
    ref = x.float() @ w.t()
    assert y.dtype == torch.float32 and y.shape == (m, rows)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-5 * max(1.0, float(ref.abs().max())))


def test_hptq_linear_op_on_a_real_hptq_weight():
    """The stored-form linear: Triton op (interpreter) == reference op == dequantized float."""
    w, h = random_problem(48, 128, seed=5)
    hw = hptq.quantize(w, h, 3.3, chunk=100)
    hq = HuffmanQuantizedTensor.from_hptq(hw)
    x = torch.randn(2, 5, 128)
    bias = torch.randn(48)
    args = (hq.bitstream, hq.symbols, hq.lengths, hq.offsets, hq.scale, bias, 48, 128,
            hq.chunk, hq.max_len)
    ref = x @ hw.dequantize().t() + bias
    fused = torch.ops.babai.hptq_linear_triton(x, *args)
    plain = torch.ops.babai.hptq_linear(x, *args)  # CPU: the reference implementation
    from babai_ao.kernels import cpu_int4

    with cpu_int4.exact_forwards():  # the exact path (the CPU default rounds x to bf16)
        via_tensor = torch.nn.functional.linear(x, hq, bias)
    for out in (fused, plain, via_tensor):
        assert out.shape == (2, 5, 48)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    for op in (torch.ops.babai.hptq_linear, torch.ops.babai.hptq_linear_triton):
        with pytest.raises(BabaiError, match="127 features"):
            op(torch.randn(1, 127), *args)
        with pytest.raises(BabaiError, match="scale"):
            op(x, *args[:4], torch.ones(3), *args[5:])


@pytest.mark.model
@pytest.mark.filterwarnings("ignore:babai_config without calibration")
def test_compiled_smollm2_keeps_hptq_weights_entropy_coded(smollm2_small):
    """torch.compile(fullgraph) of SmolLM2 blocks whose linears are HPTQ streams: the graph
    calls babai::hptq_linear (the weight is never decoded into the graph), output = eager.
    Under ``cpu_kernel("exact")``: the CPU default path is nibbles + sparse instead
    (``test_cpu_hptq_default``)."""
    import copy

    from torch._inductor.utils import run_and_get_code
    from torchao.quantization import quantize_

    from babai_ao import babai_config

    model = copy.deepcopy(smollm2_small[0])
    quantize_(model, babai_config(clip="hptq", target_bits=3.3),
              filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear)
              and fqn.startswith("model.layers."))
    hq = model.model.layers[0].mlp.down_proj.weight
    assert isinstance(hq, HuffmanQuantizedTensor) and hq.bits_per_weight < 3.4
    ids = torch.tensor([[1, 42, 314, 2718, 99]])
    from babai_ao import cpu_kernel

    with torch.no_grad(), cpu_kernel("exact"):
        eager = model(ids).logits
        compiled, code = run_and_get_code(torch.compile(model, fullgraph=True), ids)
    text = "\n".join(code)
    assert text.count("babai.hptq_linear") >= 14  # 7 linears × 2 blocks
    torch.testing.assert_close(compiled.logits, eager, rtol=0, atol=1e-4)


def test_corrupt_chunk_attributes_are_refused():
    st = huffman.encode(_codes("laplace", 64, seed=2), chunk=16)
    tensors = [st.bitstream, st.symbols, st.lengths, st.offsets, st.header, torch.ones(1)]
    HuffmanQuantizedTensor(*tensors, (8, 8), torch.float32, None, 16, st.max_len)
    with pytest.raises(BabaiError, match="corrupt"):
        HuffmanQuantizedTensor(*tensors, (8, 8), torch.float32, None, 32, st.max_len)


def test_to_dtype_keeps_the_stream_and_changes_the_compute_dtype():
    w, h = random_problem(32, 64, seed=6)
    hq = HuffmanQuantizedTensor.from_hptq(hptq.quantize(w, h, 3.3))
    low = hq.to(torch.bfloat16)
    assert isinstance(low, HuffmanQuantizedTensor) and low.dtype == torch.bfloat16
    assert torch.equal(low.bitstream, hq.bitstream) and low.chunk == hq.chunk
    x = torch.randn(2, 64)
    out = torch.nn.functional.linear(x.bfloat16(), low)
    assert out.dtype == torch.bfloat16
    ref = x.bfloat16().float() @ hq.dequantize().t()
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=1e-2 * float(ref.abs().max()))
    with pytest.raises(BabaiError, match="dequantize"):
        hq.to(torch.int8)
