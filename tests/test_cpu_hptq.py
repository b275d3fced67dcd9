"""HPTQ on CPU at 4-bit speed (``babai_ao.kernels.cpu_hptq``): the window search against
brute force, the split ``C = C₄ + Δ`` exactly, the prepared layer's weight recovered exactly
from the int4pack kernel itself, its output against exact float math, and ``prepare_cpu`` on
real HPTQ models (eager, compiled, decoded form, save/load)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from babai_ao.kernels import cpu_hptq
from babai_ao.kernels.cpu_hptq import (
    MAX_OFFSET,
    Int4SparseLinear,
    split_codes,
    window_offsets,
)

from babai_ao.ao.hptq_tensor import HuffmanQuantizedTensor, decode_model, prepare_hptq_cpu
from babai_ao.formats import hptq

BF16 = torch.bfloat16


def _codes(n: int, k: int, seed: int, spread: float = 2.5, far: float = 0.01) -> torch.Tensor:
    """HPTQ-like integer codes: rounded Gaussians with a few far outliers."""
    gen = torch.Generator().manual_seed(seed)
    c = (torch.randn(n, k, generator=gen) * spread).round()
    wild = torch.rand(n, k, generator=gen) < far
    return torch.where(wild, (torch.randn(n, k, generator=gen) * 40).round(), c).long()


def _brute_force_best(group: torch.Tensor) -> int:
    """Most codes any window [o − 8, o + 7] with |o| ≤ MAX_OFFSET can hold."""
    return max(int(((group >= o - 8) & (group <= o + 7)).sum())
               for o in range(-MAX_OFFSET, MAX_OFFSET + 1))


@pytest.mark.parametrize("group_size,shift", [(32, 0), (64, 5), (64, 300)])
def test_window_offsets_hold_the_most_codes(group_size, shift):
    """Each group's window holds as many codes as the best of all 497 windows (brute
    force); ``shift`` 300 pushes the codes past the largest offset the kernel keeps exact."""
    codes = _codes(6, 2 * group_size, seed=group_size + shift, far=0.05) + shift
    offsets = window_offsets(codes, group_size)
    assert offsets.shape == (6, 2) and int(offsets.abs().max()) <= MAX_OFFSET
    for n in range(6):
        for g in range(2):
            group = codes[n, g * group_size:(g + 1) * group_size]
            o = int(offsets[n, g])
            held = int(((group >= o - 8) & (group <= o + 7)).sum())
            assert held == _brute_force_best(group)


def test_split_holds_exactly_the_codes_off_the_window():
    codes = _codes(32, 128, seed=1, far=0.03)
    offsets = window_offsets(codes, 64)
    q, delta = split_codes(codes, offsets, 64)
    o = offsets.repeat_interleave(64, dim=1)
    outside = (codes < o - 8) | (codes > o + 7)
    assert q.min() >= 0 and q.max() <= 15
    assert torch.equal(delta != 0, outside)
    assert torch.equal(q - 8 + o + delta, codes)
    assert torch.equal(torch.where(outside, 0, codes), torch.where(outside, 0, q - 8 + o))


def _integer_weight(layer: Int4SparseLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(C₄ read back through the int4pack kernel with x = I, Δ from the COO entries)."""
    k, n = layer.in_features, layer.out_features
    eye = torch.eye(k, dtype=BF16)
    c4 = torch.ops.aten._weight_int4pack_mm_for_cpu(
        eye, layer.weight_int4pack, layer.group_size, layer.scale_zero).float().t()
    delta = torch.zeros(n, k)
    delta.index_put_((layer.sparse_rows, layer.sparse_cols), layer.sparse_val, accumulate=True)
    return c4, delta


@pytest.mark.parametrize("n,k,per_row", [(48, 96, False), (64, 576, True), (32, 1536, False)])
def test_prepared_layer_is_exactly_the_dequantized_weight(n, k, per_row):
    """The weight the kernel forms (read back with x = I: integers, exact in bf16) plus the
    sparse part is the HPTQ codes, so s·(C₄ + Δ) equals ``dequantize()`` bit for bit."""
    gen = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=gen) * 0.02
    w[torch.rand(n, k, generator=gen) < 0.003] *= 8  # heavy tail: some codes off the window
    hw = hptq.quantize(w, None, 3.3, per_row=per_row)
    layer = prepare_hptq_cpu(HuffmanQuantizedTensor.from_hptq(hw))
    assert isinstance(layer, Int4SparseLinear)
    assert layer.group_size == {96: 32, 576: 64, 1536: 256}[k]
    c4, delta = _integer_weight(layer)
    codes = hw.codes().float()
    assert torch.equal(c4 + delta, codes)
    assert layer.sparse_count == int((delta != 0).sum()) > 0
    entries = layer.sparse_val.numel()  # padded with zeros to a power of two ≥ 64
    assert entries >= 64 and entries & (entries - 1) == 0 and entries < 2 * max(64, layer.sparse_count)
    assert torch.equal(layer.scales.reshape(-1, 1) * (c4 + delta), hw.dequantize())


@pytest.mark.parametrize("m,dtype", [(1, BF16), (5, BF16), (3, torch.float32)])
def test_output_is_the_stated_rounding_of_exact_math(m, dtype):
    """``y = s·(bf16(x·C₄ᵀ) + x·Δᵀ) + b``: with activations on a coarse grid every product
    and sum is exact in fp32, so the layer matches that formula (float64 reference) bit for
    bit; with Gaussian activations it matches ``x @ Wᵀ`` to bf16 precision."""
    n, k = 64, 192
    codes = _codes(n, k, seed=m, far=0.02)
    scale = torch.tensor([0.0123], dtype=torch.float16)
    bias = torch.randn(n)
    layer = cpu_hptq.prepare_hptq_cpu(codes, scale, bias, max_sparse_fraction=1.0)
    assert layer is not None and layer.sparse_count > 0
    gen = torch.Generator().manual_seed(7)
    x = (torch.randint(-16, 17, (m, k), generator=gen) / 8).to(dtype)  # 5-bit grid
    c4 = split_codes(codes, window_offsets(codes, layer.group_size), layer.group_size)
    q, delta = c4
    o = window_offsets(codes, layer.group_size).repeat_interleave(layer.group_size, 1)
    w4 = (q - 8 + o).double()
    xd = x.double()
    y4 = (xd @ w4.t()).to(BF16).double()  # exact sum, one rounding (the kernel's output)
    s = float(scale.float())
    ref = (((y4 + xd @ delta.double().t()).float() * s) + bias).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and torch.equal(y, ref)
    xg = torch.randn(m, k, generator=gen).to(dtype)
    exact = xg.double() @ (s * codes.double()).t() + bias.double()
    torch.testing.assert_close(layer(xg).double(), exact, rtol=0,
                               atol=2 ** -7 * float(exact.abs().max()))


def test_not_built_where_it_does_not_apply_or_pay(monkeypatch):
    codes = _codes(32, 128, seed=3)
    s = torch.tensor([0.01])
    assert cpu_hptq.prepare_hptq_cpu(codes[:24], s, None) is None  # N % 16 ≠ 0
    assert cpu_hptq.prepare_hptq_cpu(codes[:, :72], s, None) is None  # no int4pack group | K
    broad = _codes(32, 128, seed=3, spread=30.0)  # 8-bit-like codes: most off any window
    assert cpu_hptq.prepare_hptq_cpu(broad, s, None) is None
    assert cpu_hptq.prepare_hptq_cpu(broad, s, None, max_sparse_fraction=1.0) is not None
    monkeypatch.setattr(cpu_hptq, "ENABLED", False)
    assert cpu_hptq.prepare_hptq_cpu(codes, s, None) is None


@pytest.mark.model
@pytest.mark.filterwarnings("ignore:babai_config without calibration")
def test_prepare_cpu_on_smollm2_hptq(smollm2_small):
    """SmolLM2 block 0 (the one with the most off-window codes) at HPTQ 3.3 bits:
    ``prepare_cpu`` makes every linear an ``Int4SparseLinear`` (< 1 % of weights sparse);
    logits match the dequantized float model at bf16 precision; compiled (fullgraph, the
    int4pack kernel in the graph) == eager; the decoded form prepares to the same layers;
    a checkpoint saved before preparing holds no prepared buffers and, loaded, prepares to
    the same outputs."""
    from torch._inductor.utils import run_and_get_code
    from torchao.quantization import quantize_

    from babai_ao import babai_config, prepare_cpu
    from babai_ao.ao.reference import dequantized_model

    float_model = copy.deepcopy(smollm2_small[0]).to(BF16)
    model = copy.deepcopy(float_model)
    quantize_(model, babai_config(clip="hptq", target_bits=3.3),
              filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear)
              and fqn.startswith("model.layers.0."))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    reference = dequantized_model(model, float_model)
    decoded, again = copy.deepcopy(model), copy.deepcopy(model)
    assert decode_model(decoded) == 7
    ids = torch.tensor([[1, 42, 314, 2718, 99]])
    with torch.no_grad():
        ref = reference(ids).logits.float()
        assert prepare_cpu(model)["Int4SparseLinear"] == 7
        assert prepare_cpu(decoded)["Int4SparseLinear"] == 7
        layers = [m for m in model.modules() if isinstance(m, Int4SparseLinear)]
        sparse = sum(m.sparse_count for m in layers)
        weights = sum(m.in_features * m.out_features for m in layers)
        assert 0 < sparse < 0.01 * weights
        eager = model(ids).logits
        compiled, code = run_and_get_code(torch.compile(model, fullgraph=True), ids)
        assert torch.equal(decoded(ids).logits, eager)
    assert "_weight_int4pack_mm_for_cpu" in "\n".join(code)
    torch.testing.assert_close(compiled.logits.float(), eager.float(), rtol=0,
                               atol=2 ** -7 * float(eager.abs().max()))
    torch.testing.assert_close(eager.float(), ref, rtol=0, atol=0.03 * float(ref.abs().max()))
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert not any("int4pack" in k or "sparse" in k for k in state)
    again.load_state_dict(state, assign=True)
    with torch.no_grad():
        prepare_cpu(again)
        assert torch.equal(again(ids).logits, eager)
