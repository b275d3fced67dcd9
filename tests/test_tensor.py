"""BabaiQuantizedTensor: torchao's conformance suites, dispatch, compile, transpose, slicing."""

from __future__ import annotations

import io

import pytest
import torch
from torchao.testing import utils as ao_testing

from babai_ao import BabaiError, quantize_weight
from babai_ao.ao.tensor import BabaiQuantizedTensor
from babai_ao.lattice.grid import dequantize as grid_dequantize

# torchao's suites compare F.linear with the quantized weight to the float one by SQNR (dB).
# 4-bit min-max groups of 32 on Gaussian weights give about 20 dB (step ≈ 4σ/15, noise
# step²/12 ≈ 0.006σ²), so the bound is set below that; 8-bit gives about 45 dB.
SUITE_KWARGS = {"bits": 4, "group_size": 32}
# torchao's module instantiates the parametrized tests; the suites are reached through the
# module so pytest does not also collect torchao's own (Int8Tensor) classes.
# Deselected: test_device1_to_device2 calls .cuda() unconditionally (needs a CUDA build).
NEEDS_CUDA = "test_device1_to_device2_device1_cpu_device2_cpu"


class TestBabaiBasic(ao_testing.TorchAOBasicTestCase):
    TENSOR_SUBCLASS = BabaiQuantizedTensor
    FACTORY_FN = staticmethod(BabaiQuantizedTensor.from_hp)
    kwargs = SUITE_KWARGS
    LINEAR_MIN_SQNR = 18
    locals()[NEEDS_CUDA] = None


class TestBabaiBasic8Bit(ao_testing.TorchAOBasicTestCase):
    TENSOR_SUBCLASS = BabaiQuantizedTensor
    FACTORY_FN = staticmethod(BabaiQuantizedTensor.from_hp)
    kwargs = {"bits": 8, "group_size": 128}
    LINEAR_MIN_SQNR = 38
    locals()[NEEDS_CUDA] = None


class TestBabaiCompile(ao_testing.TorchAOCompileTestCase):
    TENSOR_SUBCLASS = BabaiQuantizedTensor
    FACTORY_FN = staticmethod(BabaiQuantizedTensor.from_hp)
    kwargs = SUITE_KWARGS
    LINEAR_MIN_SQNR = 18
    COMPILE_MIN_SQNR = 50



def _qw(n: int = 48, k: int = 128, bits: int = 4, g: int = 32, seed: int = 0, **kw):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    x = torch.randn(4 * k, k, generator=gen) * torch.linspace(0.2, 3, k)
    return w, quantize_weight(w, x.T @ x, bits=bits, group_size=g, order="act", **kw)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_from_quantized_stores_the_codes_exactly(bits: int) -> None:
    _, qw = _qw(bits=bits)
    t = BabaiQuantizedTensor.from_quantized(qw, torch.float32)
    assert t.qdata.dtype == torch.uint8 and t.qdata.shape == (48, 128 * bits // 8)
    assert torch.equal(t.codes(), qw.codes.long())
    assert torch.equal(t.zero_points(), qw.zeros.long())
    assert torch.equal(t.scale, qw.scales)
    # independent reference: the grid formula on the quantizer's own integers
    ref = grid_dequantize(qw.codes, qw.scales.float(), qw.zeros, 32)
    assert torch.equal(t.dequantize(), ref)
    # stored bytes: codes b·K/8 + fp16 scales + b-bit zeros per group of 32
    assert t.bits_per_weight == pytest.approx(bits + (16 + bits) / 32)
    assert t.certificate.bits_per_weight == t.bits_per_weight
    assert t.certificate.error == qw.certificate.error
    assert torch.equal(t.certificate.pivots, qw.certificate.pivots)


def test_clip_false_codes_are_rejected() -> None:
    _, qw = _qw(bits=2, clip=False)
    assert int(qw.codes.min()) < 0 or int(qw.codes.max()) > 3  # the case this test needs
    with pytest.raises(BabaiError, match="clip=True"):
        BabaiQuantizedTensor.from_quantized(qw, torch.float32)


def test_every_matmul_route_equals_dequantized_math() -> None:
    """Under ``cpu_kernel("exact")`` (the default CPU path rounds x to bf16 for this 4-bit
    layer: tests/test_cpu_default_path.py)."""
    from babai_ao import cpu_kernel

    _, qw = _qw()
    t = BabaiQuantizedTensor.from_quantized(qw, torch.float32)
    w = grid_dequantize(qw.codes, qw.scales.float(), qw.zeros, 32).double()
    x, b = torch.randn(2, 5, 128), torch.randn(48)
    ref = (x.double() @ w.T + b.double()).float()
    with cpu_kernel("exact"):
        outs = {
            "F.linear": torch.nn.functional.linear(x, t, b),
            "aten.linear": torch.ops.aten.linear.default(x, t, b),
            "mm": torch.mm(x[0], t.t()) + b,
            "addmm": torch.addmm(b, x[0], t.t()),
            "matmul": x @ t.t() + b,
        }
    for name, out in outs.items():
        torch.testing.assert_close(out, ref[0] if out.dim() == 2 else ref, msg=name)


def test_single_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    """F.linear, mm and addmm all reach torch.ops.babai.linear through babai_linear."""
    import babai_ao.ao.tensor as tensor_mod

    calls = []
    real = tensor_mod.babai_linear
    monkeypatch.setattr(tensor_mod, "babai_linear", lambda *a: calls.append(1) or real(*a))
    _, qw = _qw()
    t = BabaiQuantizedTensor.from_quantized(qw, torch.float32)
    x = torch.randn(3, 128)
    torch.nn.functional.linear(x, t)
    torch.mm(x, t.t())
    torch.addmm(torch.zeros(48), x, t.t())
    assert len(calls) == 3


def test_transpose_slice_to_clone() -> None:
    _, qw = _qw()
    t = BabaiQuantizedTensor.from_quantized(qw, torch.float32)
    w = t.dequantize()
    assert t.t().shape == (128, 48) and torch.equal(t.t().dequantize(), w.T)
    assert torch.equal(t.t().t().dequantize(), w)
    assert torch.equal(t[5:17].dequantize(), w[5:17])
    assert torch.equal(t[:, 32:96].dequantize(), w[:, 32:96])
    assert torch.equal(t.t()[32:64].dequantize(), w.T[32:64])
    with pytest.raises(BabaiError, match="group boundaries"):
        t[:, 3:40]
    for c in (t.clone(), t.detach(), t.to("cpu")):
        assert type(c) is BabaiQuantizedTensor and torch.equal(c.dequantize(), w)
    h = t.to(torch.bfloat16)
    assert h.dtype == torch.bfloat16 and torch.equal(h.qdata, t.qdata)
    assert torch.equal(h.dequantize(torch.float32), w)


def test_pickle_and_flatten_keep_everything() -> None:
    _, qw = _qw(bits=3)
    t = BabaiQuantizedTensor.from_quantized(qw, torch.bfloat16)
    buf = io.BytesIO()
    torch.save({"w": t}, buf)
    buf.seek(0)
    u = torch.load(buf, weights_only=True)["w"]
    assert type(u) is BabaiQuantizedTensor and u.dtype == torch.bfloat16 and u.bits == 3
    for name in ("qdata", "scale", "zero_point"):
        assert torch.equal(getattr(u, name), getattr(t, name))
    assert_same_certificate(u.certificate, t.certificate)
    names, attrs = t.__tensor_flatten__()
    v = BabaiQuantizedTensor.__tensor_unflatten__({n: getattr(t, n) for n in names}, attrs,
                                                  t.shape, t.stride())
    assert v.certificate_json == t.certificate_json


def assert_same_certificate(a, b) -> None:
    assert torch.equal(a.pivots, b.pivots)
    assert a.summary() == b.summary() and a.identity == b.identity


def _mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.GELU(),
                               torch.nn.Linear(64, 32)).eval()


def test_compiled_model_has_no_graph_breaks_and_matches_eager() -> None:
    from torch._dynamo.utils import counters

    model = _mlp()
    for lin in (model[0], model[2]):
        lin.weight = torch.nn.Parameter(
            BabaiQuantizedTensor.from_hp(lin.weight.detach(), bits=4, group_size=32),
            requires_grad=False)
    x = torch.randn(3, 128)
    eager = model(x)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True)(x)
    assert not counters["graph_break"]
    torch.testing.assert_close(compiled, eager)
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_input_gradient_flows_through_the_quantized_weight() -> None:
    """Exact CPU path (the default path's gradient: tests/test_cpu_default_path.py)."""
    from babai_ao import cpu_kernel

    _, qw = _qw()
    t = BabaiQuantizedTensor.from_quantized(qw, torch.float32)
    x = torch.randn(4, 128, dtype=torch.float64).float().requires_grad_()
    b = torch.zeros(48, requires_grad=True)
    with cpu_kernel("exact"):
        torch.nn.functional.linear(x, t, b).pow(2).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    b2 = torch.zeros(48, requires_grad=True)
    torch.nn.functional.linear(x2, t.dequantize(), b2).pow(2).sum().backward()
    # the forward outputs already differ by float32 summation order
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-4, atol=1e-4)


def test_corrupt_data_is_rejected() -> None:
    _, qw = _qw()
    t = BabaiQuantizedTensor.from_quantized(qw, torch.float32)
    with pytest.raises(BabaiError, match="packed"):
        BabaiQuantizedTensor(t.qdata[:, :-1], t.scale, t.zero_point, 4, 32, (48, 128),
                             torch.float32)
    with pytest.raises(BabaiError, match="packed"):  # a 4-bit layout read as 3-bit
        BabaiQuantizedTensor(t.qdata, t.scale, t.zero_point, 3, 32, (48, 128), torch.float32)
    with pytest.raises(BabaiError, match="scales"):
        BabaiQuantizedTensor(t.qdata, t.scale[:, :2], t.zero_point, 4, 32, (48, 128),
                             torch.float32)
