"""Triton kernels (under TRITON_INTERPRET=1 on CPU) and the CPU path vs the reference.

The interpreter is slow, so the fused-matmul grid is a hand-picked covering set, not the
full cross product: every bit width, group size 32/64/128, M ∈ {1, 3, 17, 64}, activation
dtype, outliers on/off and permutation on/off each appear, K and N are never multiples of
the 32-wide interpreter tiles (K a multiple of the group only), plus two group sizes (16, 48)
that do not divide the K tile, which take the per-element scale path.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # on a GPU the kernels run for real
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (conftest too)

import babai_ao.kernels  # noqa: E402,F401
import pytest  # noqa: E402
from _kernels_util import random_layer, reference  # noqa: E402
from babai_ao.kernels import cpu_int4  # noqa: E402
from babai_ao.kernels.configs import INTERPRET  # noqa: E402
from babai_ao.kernels.cpu import linear_cpu, unpack_rows  # noqa: E402

from babai_ao.errors import BabaiError  # noqa: E402
from babai_ao.formats.packed_weight import dequantize_packed  # noqa: E402
from babai_ao.formats.packing import pack, unpack  # noqa: E402


def test_kernels_can_run_here():
    assert INTERPRET or torch.cuda.is_available(), (
        "Triton kernels were defined without TRITON_INTERPRET=1 and there is no GPU: "
        "tests/conftest.py must set it before babai_ao.ao.ops is imported")

DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
TOL = {F32: 1e-5, F16: 2e-3, BF16: 2e-2}  # relative to max |reference|

# bits, group, M, N, K, dtype, outliers, permutation
CASES = [
    (2, 32, 1, 40, 96, F16, False, False),
    (3, 64, 3, 50, 192, BF16, True, True),
    (4, 128, 17, 33, 384, F32, True, False),
    (8, 32, 64, 24, 160, BF16, False, True),
    (4, 64, 1, 72, 192, BF16, True, True),
    (3, 32, 17, 20, 96, F16, False, False),
    (2, 128, 64, 36, 256, F32, True, True),
    (8, 64, 3, 40, 128, F32, False, False),
    (4, 16, 3, 24, 80, BF16, True, True),  # group < K tile
    (3, 48, 17, 24, 96, F16, True, False),  # group not a multiple of the K tile
    (3, 20, 1, 24, 100, F16, True, True),  # K % 8 ≠ 0: the packed row ends in padding
    (4, 52, 17, 24, 52, BF16, False, True),  # one group per row, K % 8 ≠ 0
]


def _to(layer: dict) -> dict:
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in layer.items()}


@pytest.mark.parametrize("bits,gs,m,n,k,dtype,outliers,permute", CASES)
def test_fused_matmul_matches_reference(bits, gs, m, n, k, dtype, outliers, permute):
    layer = random_layer(bits, gs, n, k, outliers, seed=bits * 100 + m)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if m % 2 else None
    perm = torch.randperm(k, generator=gen) if permute else None
    ref = reference(x, layer, bias, perm)
    out = torch.ops.babai.linear_triton(x.to(DEVICE), bias=None if bias is None else
                                        bias.to(DEVICE), act_perm=None if perm is None else
                                        perm.to(DEVICE), **_to(layer)).cpu()
    assert out.dtype == dtype and out.shape == (m, n)
    torch.testing.assert_close(out.float(), ref, rtol=0,
                               atol=TOL[dtype] * float(ref.abs().max()))
    # the CPU path agrees too (and is what babai::linear runs on CPU)
    cpu = linear_cpu(x, bias=bias, act_perm=perm, **layer)
    torch.testing.assert_close(cpu.float(), ref, rtol=0, atol=TOL[dtype] * float(ref.abs().max()))


def test_outliers_change_the_result():
    """The CSR kernel is not a no-op: dropping the outliers changes the output."""
    layer = random_layer(4, 32, 24, 96, outliers=True, seed=3)
    dense = {k: v for k, v in layer.items() if not k.startswith("outlier")}
    x = torch.randn(2, 96)
    full = torch.ops.babai.linear_triton(x, bias=None, **layer)
    part = torch.ops.babai.linear_triton(x, bias=None, **dense)
    assert (full - part).abs().max() > 0.05
    torch.testing.assert_close(part, reference(x, dense), rtol=0, atol=1e-4)


def test_leading_dims_and_empty_batch():
    layer = random_layer(4, 32, 20, 64, seed=4)
    x = torch.randn(2, 3, 64)
    out = torch.ops.babai.linear_triton(x, bias=None, **layer)
    assert out.shape == (2, 3, 20)
    torch.testing.assert_close(out, reference(x, layer), rtol=0, atol=1e-4)
    assert torch.ops.babai.linear_triton(x[:0], bias=None, **layer).shape == (0, 3, 20)


@pytest.mark.parametrize("bits,gs,dtype,outliers", [
    (2, 64, F32, True), (3, 32, F16, False), (4, 128, BF16, True), (8, 48, F32, False)])
def test_dequant_kernel(bits, gs, dtype, outliers):
    n, k = 37, 3 * gs if gs != 128 else 256
    k = k - k % gs
    layer = random_layer(bits, gs, n, k, outliers, seed=bits)
    w = torch.ops.babai.dequantize_triton(dtype=dtype, **_to(layer)).cpu()
    ref = dequantize_packed(**layer, dtype=dtype)
    assert w.dtype == dtype and w.shape == (n, k)
    torch.testing.assert_close(w, ref, rtol=0, atol=TOL[dtype] * float(ref.abs().max()))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_cpu_unpack_equals_packing_unpack(bits):
    codes = torch.randint(0, 2**bits, (5, 43))
    p = pack(codes, bits)
    assert torch.equal(unpack_rows(p, bits, 43), unpack(p, bits, 43))
    assert torch.equal(unpack_rows(p, bits, 43).long(), codes)


def test_babai_linear_on_cpu_dispatches_to_fast_path():
    layer = random_layer(3, 32, 30, 96, outliers=True, seed=5)
    x = torch.randn(4, 96).to(BF16)
    bias = torch.randn(30).to(BF16)
    out = torch.ops.babai.linear(x, layer["packed"], layer["scales"], layer["zeros"], bias,
                                 3, 32, 96, layer["outlier_ptr"], layer["outlier_idx"],
                                 layer["outlier_val"])
    ref = reference(x, layer, bias)
    assert out.dtype == BF16
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=2e-2 * float(ref.abs().max()))


@pytest.mark.parametrize("gs,m,outliers,permute", [
    (32, 1, False, False), (64, 5, True, True), (128, 17, True, False), (256, 2, False, True)])
def test_cpu_int4pack_path_matches_reference(gs, m, outliers, permute):
    """4-bit + bf16 activations on CPU run torch's int4pack kernel on the cached layout."""
    n, k = 48, 512
    layer = random_layer(4, gs, n, k, outliers, seed=gs + m)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=gen).to(BF16)
    bias = torch.randn(n, generator=gen).to(BF16)
    perm = torch.randperm(k, generator=gen) if permute else None
    built = cpu_int4.stats["built"]
    out = torch.ops.babai.linear(x, layer["packed"], layer["scales"], layer["zeros"], bias, 4,
                                 gs, k, layer.get("outlier_ptr"), layer.get("outlier_idx"),
                                 layer.get("outlier_val"), perm)
    assert cpu_int4.stats["built"] == built + 1  # this call built (and used) the layout
    ref = reference(x, layer, bias, perm)
    assert out.dtype == BF16 and out.shape == (m, n)
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=TOL[BF16] * float(ref.abs().max()))
    hits = cpu_int4.stats["hits"]
    again = linear_cpu(x, bias=bias, act_perm=perm, **layer)
    assert cpu_int4.stats["hits"] == hits + 1 and torch.equal(again, out)


def test_cpu_int4pack_layout_follows_in_place_writes():
    """Overwriting a layer's codes in place (a checkpoint load) rebuilds the cached layout."""
    layer = random_layer(4, 64, 32, 128, seed=7)
    x = torch.randn(2, 128).to(BF16)
    before = linear_cpu(x, bias=None, **layer)
    other = random_layer(4, 64, 32, 128, seed=8)
    layer["packed"].copy_(other["packed"])
    layer["scales"].copy_(other["scales"])
    layer["zeros"].copy_(other["zeros"])
    after = linear_cpu(x, bias=None, **layer)
    ref = reference(x, other)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after.float(), ref, rtol=0, atol=TOL[BF16] * float(ref.abs().max()))


@pytest.mark.parametrize("dtype,n,gs", [(F32, 32, 64), (BF16, 40, 64), (BF16, 32, 16)])
def test_cpu_int4pack_not_taken_outside_its_domain(dtype, n, gs):
    """fp32 activations stay exact (dequant + fp32 mm); N % 16 ≠ 0 or other groups fall back."""
    layer = random_layer(4, gs, n, 128, seed=9)
    x = torch.randn(3, 128).to(dtype)
    built, hits = cpu_int4.stats["built"], cpu_int4.stats["hits"]
    out = linear_cpu(x, bias=None, **layer)
    assert (cpu_int4.stats["built"], cpu_int4.stats["hits"]) == (built, hits)
    ref = reference(x, layer)
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=TOL[dtype] * float(ref.abs().max()))


@pytest.mark.filterwarnings("ignore:babai_config without calibration")
def test_prepare_cpu_swaps_eligible_4bit_layers_and_matches():
    """``prepare_cpu``: eligible 4-bit linears become Int4PackLinear (same kernel, same
    numbers as babai::linear's int4pack path); others keep the tensor subclass."""
    from babai_ao.kernels.cpu_int4 import Int4PackLinear
    from torch._inductor.utils import run_and_get_code
    from torchao.quantization import quantize_

    from babai_ao import BabaiQuantizedTensor, babai_config, prepare_cpu

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(64, 40),
                                torch.nn.Linear(40, 32, bias=False)).to(BF16)
    quantize_(model[:2], babai_config(bits=4, group_size=32))  # N = 40: not eligible
    quantize_(model[2:], babai_config(bits=3, group_size=8))  # 3 bit: not eligible
    x = torch.randn(5, 128).to(BF16)
    with torch.no_grad():
        ref = model(x)
        assert prepare_cpu(model) == {"Int4PackLinear": 1, "Int8PackLinear": 0,
                                      "Int4SparseLinear": 0}
        assert isinstance(model[0], Int4PackLinear)
        assert isinstance(model[1].weight, BabaiQuantizedTensor)
        out = model(x)
        compiled, code = run_and_get_code(torch.compile(model, fullgraph=True), x)
    assert torch.equal(out, ref)
    torch.testing.assert_close(compiled.float(), ref.float(), rtol=0,
                               atol=TOL[BF16] * float(ref.abs().max()))
    text = "\n".join(code)
    assert "_weight_int4pack_mm_for_cpu" in text and "babai.linear" in text


@pytest.mark.filterwarnings("ignore:babai_config without calibration")
def test_prepare_cpu_runs_hptq_layers_on_the_int8_kernel(monkeypatch):
    """HPTQ weights (stored Huffman form) → decoded → Int8PackLinear: ``x @ (s·(q − 128))ᵀ``
    with int8 ``q − 128``; matches the dequantized float weight at bf16 precision (the int8
    fallback, with the nibble + sparse form of ``cpu_hptq`` turned off)."""
    from babai_ao.kernels import cpu_hptq
    from babai_ao.kernels.cpu_int8 import Int8PackLinear

    monkeypatch.setattr(cpu_hptq, "ENABLED", False)
    from torchao.quantization import quantize_

    from babai_ao import babai_config, prepare_cpu

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.Linear(64, 48))
    quantize_(model, babai_config(clip="hptq", target_bits=3.3))
    w = [m.weight.dequantize() for m in model]
    x = torch.randn(3, 96)
    with torch.no_grad():
        ref = torch.nn.functional.linear(torch.nn.functional.linear(x, w[0], model[0].bias),
                                         w[1], model[1].bias)
    with pytest.warns(UserWarning, match="bfloat16"):  # an fp32 model: says it computes bf16
        assert prepare_cpu(model) == {"Int4PackLinear": 0, "Int8PackLinear": 2,
                                      "Int4SparseLinear": 0}
    assert all(isinstance(m, Int8PackLinear) for m in model)
    from torch._inductor.utils import run_and_get_code

    with torch.no_grad():
        out = model(x)
        compiled, code = run_and_get_code(torch.compile(model, fullgraph=True), x)
    assert out.dtype == F32 and "_weight_int8pack_mm" in "\n".join(code)
    for y in (out, compiled):
        torch.testing.assert_close(y, ref, rtol=0, atol=2e-2 * float(ref.abs().max()))


def test_bad_inputs_name_the_fix():
    layer = random_layer(4, 32, 8, 64)
    x = torch.randn(1, 64)
    with pytest.raises(BabaiError, match="group_size"):
        torch.ops.babai.linear_triton(x, bias=None, **{**layer, "group_size": 48})
    with pytest.raises(BabaiError, match="pack"):
        torch.ops.babai.linear_triton(x, bias=None, **{**layer, "packed": layer["packed"][:, 1:]})
    with pytest.raises(BabaiError, match="bits"):
        torch.ops.babai.linear_triton(x, bias=None, **{**layer, "bits": 5})
