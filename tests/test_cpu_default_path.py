"""The default CPU path of a quantized ``F.linear``: torch's int4pack kernel with bf16
activations, chosen with no user action on fp32 and bf16 models; ``cpu_kernel("exact")``.

References: the kernel's own arithmetic written out in float (``(q − 8)·a + c`` with bf16
``a = s``, ``c = s·(8 − z)``, bf16-rounded activations), the dequantized weight through
plain ``F.linear`` (exact mode: bit for bit), eager vs compiled.
"""

from __future__ import annotations

import io

import pytest
import torch
from babai_ao.kernels import cpu_int4
from torch._inductor.utils import run_and_get_code
from torchao.quantization import quantize_

from babai_ao import BabaiError, BabaiQuantizedTensor, babai_config, cpu_kernel, quantize_weight

pytestmark = pytest.mark.filterwarnings("ignore:babai_config without calibration")
BF16 = torch.bfloat16
KERNEL_CALL = "torch.ops.quantized.int4mm_packed_weight_cpu.default("


def _weight(n: int = 64, k: int = 256, g: int = 64, bits: int = 4, seed: int = 0,
            dtype: torch.dtype = torch.float32) -> BabaiQuantizedTensor:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    return BabaiQuantizedTensor.from_quantized(
        quantize_weight(w, None, bits=bits, group_size=g), dtype)


def _kernel_math(x: torch.Tensor, t: BabaiQuantizedTensor) -> torch.Tensor:
    """What the int4pack kernel computes, in float64: bf16 x, ``(q − 8)·a + c`` per group."""
    g = t.group_size
    s = t.scale.float()
    a = s.to(BF16).double()
    c = (s * (8 - t.zero_points().float())).to(BF16).double()
    q = t.codes().double().reshape(t.out_features, -1, g)
    w = ((q - 8) * a[..., None] + c[..., None]).reshape(t.out_features, -1)
    return x.to(BF16).double() @ w.T


def test_default_path_is_the_int4pack_kernel_on_fp32_activations():
    t = _weight()
    x, b = torch.randn(5, 256), torch.randn(64)
    assert t.cpu_int4pack is None
    out = torch.nn.functional.linear(x, t, b)
    assert out.dtype == torch.float32 and t.cpu_int4pack is not None  # built on first use
    ref = _kernel_math(x, t)
    # the kernel rounds its output to bf16 (8 significant bits), then the bias is added
    torch.testing.assert_close(out.double() - b.double(), ref, rtol=2**-7,
                               atol=2**-7 * float(ref.abs().max()))
    with cpu_kernel("exact"):
        exact = torch.nn.functional.linear(x, t, b)
    # stated tolerance of the default vs the exact path: bf16 rounding of x and of y
    err = float((out - exact).abs().max())
    assert 0 < err <= 2**-6 * float(exact.abs().max())


@pytest.mark.parametrize("shape,bias", [((3, 256), True), ((2, 7, 256), False)])
def test_exact_mode_is_bit_exact_vs_dequantized_f_linear(shape, bias):
    t = _weight()
    x = torch.randn(*shape)
    b = torch.randn(64) if bias else None
    with cpu_kernel("exact"):
        out = torch.nn.functional.linear(x, t, b)
    assert torch.equal(out, torch.nn.functional.linear(x, t.dequantize(torch.float32), b))
    assert t.cpu_int4pack is None  # exact mode builds no layout


def test_bf16_model_default_equals_kernel_and_prepare_cpu():
    t = _weight(dtype=BF16)
    x, b = torch.randn(4, 256).to(BF16), torch.randn(64).to(BF16)
    out = torch.nn.functional.linear(x, t, b)
    lin = cpu_int4.Int4PackLinear.from_weight(t, b)
    assert out.dtype == BF16 and torch.equal(out, lin(x))


def test_gradient_flows_through_the_default_path():
    """x that needs a gradient: same forward (the kernel), ∂/∂x = grad · W with the exact W."""
    t = _weight()
    x = torch.randn(3, 256, requires_grad=True)
    out = torch.nn.functional.linear(x, t)
    with torch.no_grad():
        assert torch.equal(out, torch.nn.functional.linear(x, t))
    grad = torch.randn_like(out)
    out.backward(grad)
    ref = (grad.to(BF16).double() @ t.dequantize(torch.float64).to(torch.float64))
    torch.testing.assert_close(x.grad.double(), ref, rtol=2**-6, atol=2**-6 * float(ref.abs().max()))


@pytest.mark.parametrize("case", ["n%16", "3-bit", "group 16", "fp16", "exact"])
def test_other_cases_take_babai_linear(case, monkeypatch):
    calls = []
    real = torch.ops.babai.linear
    monkeypatch.setattr(torch.ops.babai, "linear",
                        lambda *a, **k: calls.append(1) or real(*a, **k), raising=False)
    kw = {"n%16": dict(n=40), "3-bit": dict(bits=3), "group 16": dict(g=16)}.get(case, {})
    t = _weight(**kw)
    x = torch.randn(3, 256)
    if case == "fp16":
        x = x.half()
        t = t.to(torch.float16)
    if case == "exact":
        with cpu_kernel("exact"):
            torch.nn.functional.linear(x, t)
    else:
        torch.nn.functional.linear(x, t)
    assert calls == [1] and t.cpu_int4pack is None


def test_compiled_equals_eager_calls_the_kernel_without_graph_breaks():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 96), torch.nn.SiLU(),
                                torch.nn.Linear(96, 64, bias=False))
    quantize_(model, babai_config(bits=4, group_size=32))
    x = torch.randn(3, 128)
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(x)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0)
        torch._dynamo.reset()
        compiled, code = run_and_get_code(torch.compile(model, fullgraph=True), x)
        eager = model(x)
        with cpu_kernel("exact"):  # the mode is guarded: this recompiles to babai::linear
            exact_compiled = torch.compile(model, fullgraph=True)(x)
            exact = model(x)
    text = "\n".join(code)
    # Inductor's lowering of aten._weight_int4pack_mm_for_cpu: one kernel call per layer
    assert text.count(KERNEL_CALL) == 2
    assert "babai.linear" not in text and "convert_weight_to_int4pack" not in text
    assert torch.equal(compiled, eager)
    assert torch.equal(exact_compiled, exact) and not torch.equal(exact, eager)
    assert all(m.weight.cpu_int4pack is not None for m in (model[0], model[2]))


def test_compile_builds_the_layout_when_eager_never_ran():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    quantize_(model, babai_config(bits=4, group_size=32))
    assert model[0].weight.cpu_int4pack is None
    x = torch.randn(2, 64)
    with torch.no_grad():
        out, code = run_and_get_code(torch.compile(model, fullgraph=True), x)
    assert model[0].weight.cpu_int4pack is not None  # built when compile looked at it
    assert "\n".join(code).count(KERNEL_CALL) == 1
    assert torch.equal(out, model(x))


def test_layout_is_never_saved_and_follows_casts_and_loads():
    t = _weight()
    plain = io.BytesIO()
    torch.save(t, plain)
    t.cpu_layout(build=True)
    cached = io.BytesIO()
    torch.save(t, cached)
    assert len(cached.getvalue()) == len(plain.getvalue())
    cached.seek(0)
    loaded = torch.load(cached, weights_only=False)
    assert loaded.cpu_int4pack is None and torch.equal(loaded.qdata, t.qdata)
    assert t.nbytes_stored == loaded.nbytes_stored
    same = t.cpu_int4pack.data_ptr()
    assert t.detach().cpu_int4pack.data_ptr() == same  # views keep it
    assert t.to(BF16).cpu_int4pack.data_ptr() == same  # a dtype cast too (same data)
    assert t[:16].cpu_int4pack is None  # a slice is other data: rebuilt when used
    # an in-place load (load_state_dict without assign) refills the layout in place
    other = _weight(seed=1)
    layout = t.cpu_int4pack
    t.copy_(other)
    assert t.cpu_int4pack is layout
    x = torch.randn(2, 256)
    assert torch.equal(torch.nn.functional.linear(x, t), torch.nn.functional.linear(x, other))


def test_cpu_kernel_mode_is_checked_and_restored():
    assert cpu_int4.MODE == "auto"
    with cpu_kernel("exact"):
        assert cpu_int4.MODE == "exact"
    assert cpu_int4.MODE == "auto"
    with pytest.raises(BabaiError, match="unknown"):
        cpu_int4.set_cpu_kernel("fast")


def test_flatten_result_is_kept_once_final_and_dropped_on_assignment():
    """A compiled graph flattens every weight on every call; the result is kept on a real
    tensor once its layout exists (or cannot), equal to a fresh computation, and any
    attribute assignment drops it."""
    from torchao.utils import TorchAOBaseTensor

    t = _weight()
    assert "_flattened" not in t.__dict__ and t.__tensor_flatten__()[0] == t.tensor_data_names
    assert "_flattened" not in t.__dict__  # eligible, no layout yet: compile may build it
    torch.nn.functional.linear(torch.randn(1, 256), t)
    names, attrs = t.__tensor_flatten__()
    assert names == [*t.tensor_data_names, *t.cpu_layout_names] and "_flattened" in t.__dict__
    base_names, base_attrs = TorchAOBaseTensor.__tensor_flatten__(t)
    assert t.__tensor_flatten__() == ([*base_names, *t.cpu_layout_names], base_attrs)
    names.append("x")  # callers get copies
    assert "x" not in t.__tensor_flatten__()[0]
    t.certificate_json = "{}"
    assert "_flattened" not in t.__dict__ and t.__tensor_flatten__()[1]["certificate_json"] == "{}"
    odd = _weight(bits=3)  # not eligible: final at once
    odd.__tensor_flatten__()
    assert "_flattened" in odd.__dict__
