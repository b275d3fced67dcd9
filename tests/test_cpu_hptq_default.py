"""The default CPU path of an HPTQ weight's ``F.linear``: ``kernels.cpu_hptq`` (the C++ op on
each group's 16-code window as nibbles + sparse correction) from a layout kept on the
``HuffmanQuantizedTensor``, with no user action; ``cpu_kernel("exact")`` turns it off.

References: the dequantized weight through plain ``F.linear`` (default: within fp32
summation error; exact mode: bit for bit), the prepared
module ``prepare_hptq_cpu`` (same arithmetic, bit for bit), eager vs compiled.
"""

from __future__ import annotations

import io

import pytest
import torch
from babai_ao.kernels import cpu_hptq, cpu_int4
from torch._inductor.utils import run_and_get_code

from babai_ao import cpu_kernel
from babai_ao.ao.hptq_tensor import HuffmanQuantizedTensor, prepare_hptq_cpu
from babai_ao.formats import hptq

KERNEL_CALL = "torch.ops.babai_cpu.hptq_linear.default("


def _weight(n: int = 64, k: int = 192, seed: int = 0, per_row: bool = True
            ) -> HuffmanQuantizedTensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.02
    w[torch.rand(n, k, generator=gen) < 0.003] *= 8  # heavy tail: some codes off the window
    return HuffmanQuantizedTensor.from_hptq(hptq.quantize(w, None, 3.3, per_row=per_row))


def _linear(n: int, k: int, seed: int, bias: bool = True) -> torch.nn.Linear:
    lin = torch.nn.Linear(k, n, bias=bias)
    lin.weight = torch.nn.Parameter(_weight(n, k, seed), requires_grad=False)
    return lin


@pytest.mark.parametrize("shape,bias", [((5, 192), True), ((2, 3, 192), False)])
def test_default_path_is_the_nibble_sparse_form(shape, bias):
    t = _weight()
    x = torch.randn(*shape)
    b = torch.randn(64) if bias else None
    assert t.cpu_hptq_layout is None
    out = torch.nn.functional.linear(x, t, b)
    assert t.cpu_hptq_layout is not None  # and codes off their windows: hi rows or sparse entries
    parts = cpu_hptq.layout_parts(t.cpu_hptq_layout)
    assert parts["entries"] + parts["hi_rows"].numel() > 0
    assert out.dtype == torch.float32 and out.shape == (*shape[:-1], 64)
    exact = torch.nn.functional.linear(x, t.dequantize(torch.float32), b)
    err = float((out - exact).abs().max())  # fp32 sums in another order: no bf16 rounding
    assert err <= 1e-4 * float(exact.abs().max())
    layer = prepare_hptq_cpu(t, b)  # the module form: the same arithmetic
    assert torch.equal(out, layer(x))


@pytest.mark.parametrize("shape,bias", [((3, 192), True), ((2, 7, 192), False)])
def test_exact_mode_is_bit_exact_and_builds_nothing(shape, bias):
    t = _weight(seed=1)
    x = torch.randn(*shape)
    b = torch.randn(64) if bias else None
    ref = torch.nn.functional.linear(x, t.dequantize(torch.float32), b)
    with cpu_kernel("exact"):
        assert torch.equal(torch.nn.functional.linear(x, t, b), ref)
    with cpu_int4.exact_forwards():  # calibration / perplexity scope: the same
        assert torch.equal(torch.nn.functional.linear(x, t, b), ref)
    assert t.cpu_hptq_layout is None


def test_where_the_form_does_not_fit_the_reference_runs(monkeypatch):
    odd = _weight(n=40, k=200, seed=2)  # no window group (32..256) divides K = 200
    assert not odd.cpu_layout_eligible()
    x = torch.randn(2, 200)
    ref = torch.nn.functional.linear(x, odd.dequantize(torch.float32))
    assert torch.equal(torch.nn.functional.linear(x, odd), ref)
    x = torch.randn(2, 192)
    rows40 = _weight(n=40, seed=2)  # N = 40: rows padded to whole blocks, the form applies
    assert rows40.cpu_layout_eligible()
    out = torch.nn.functional.linear(x, rows40)
    assert rows40.cpu_hptq_layout is not None
    exact = torch.nn.functional.linear(x, rows40.dequantize(torch.float32))
    assert float((out - exact).abs().max()) <= 1e-4 * float(exact.abs().max())  # fp32 sums
    monkeypatch.setattr(cpu_hptq, "ENABLED", False)  # declined at build: tried once
    t = _weight(seed=3)
    assert torch.equal(torch.nn.functional.linear(x, t),
                       torch.nn.functional.linear(x, t.dequantize(torch.float32)))
    assert t.cpu_hptq_layout is None and t._cpu_layout_absent


def test_compiled_equals_eager_one_graph_calls_the_kernel():
    torch.manual_seed(0)
    model = torch.nn.Sequential(_linear(96, 192, 4), torch.nn.SiLU(),
                                _linear(64, 96, 5, bias=False))
    x = torch.randn(3, 192)
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(x)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0)
        torch._dynamo.reset()
        fresh = torch.nn.Sequential(_linear(96, 192, 4), torch.nn.SiLU(),
                                    _linear(64, 96, 5, bias=False))
        assert fresh[0].weight.cpu_hptq_layout is None
        compiled, code = run_and_get_code(torch.compile(fresh, fullgraph=True), x)
        assert fresh[0].weight.cpu_hptq_layout is not None  # built when compile looked at it
        eager = fresh(x)
    text = "\n".join(code)
    assert text.count(KERNEL_CALL) == 2
    assert "babai.hptq_linear" not in text  # not the decoding reference
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-6 * float(eager.abs().max()))


def test_layout_is_never_saved_and_follows_detach():
    t = _weight(seed=6)
    empty = io.BytesIO()
    torch.save(t, empty)
    torch.nn.functional.linear(torch.randn(1, 192), t)
    full = io.BytesIO()
    torch.save(t, full)
    assert len(full.getvalue()) == len(empty.getvalue())
    full.seek(0)
    loaded = torch.load(full, weights_only=True)
    assert loaded.cpu_hptq_layout is None and torch.equal(loaded.dequantize(), t.dequantize())
    d = t.detach()  # torchao's per-tensor op: the layout's tensors detached, not copied
    assert d.cpu_hptq_layout.data_ptr() == t.cpu_hptq_layout.data_ptr()
    assert t.to(torch.bfloat16).cpu_hptq_layout is t.cpu_hptq_layout
