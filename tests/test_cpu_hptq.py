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
    """(C₄ + the hi rows, read back through the int4pack kernel with x = I; Δ from the COO
    entries)."""
    k, n = layer.in_features, layer.out_features
    eye = torch.eye(k, dtype=BF16)
    read = torch.ops.aten._weight_int4pack_mm_for_cpu(
        eye, layer.weight_int4pack, layer.group_size, layer.scale_zero).float().t()
    c4 = read[:n].index_add(0, layer.hi_rows.long(), read[n:])
    delta = torch.zeros(n, k)
    delta.index_put_((layer.sparse_rows.long(), layer.sparse_cols.long()), layer.sparse_val,
                     accumulate=True)
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
    entries = layer.sparse_val.numel()  # padded with zeros
    assert entries == cpu_hptq.padded_length(layer.sparse_count)
    assert torch.equal(layer.scales.reshape(-1, 1) * (c4 + delta), hw.dequantize())


def _stated_output(layer: Int4SparseLinear, x: torch.Tensor, bias: torch.Tensor | None
                   ) -> torch.Tensor:
    """``s·(bf16(x·C₄ᵀ) + bf16(x·Hiᵀ) scattered to their rows + x·Δᵀ) + b`` in float64 from
    the layer's own integer weights (read back with x = I), each kernel output rounded once
    to bf16; exact in fp32 when x lies on a coarse grid (every partial sum is)."""
    k, n = layer.in_features, layer.out_features
    read = torch.ops.aten._weight_int4pack_mm_for_cpu(
        torch.eye(k, dtype=BF16), layer.weight_int4pack, layer.group_size,
        layer.scale_zero).double().t()
    _, delta = _integer_weight(layer)
    xd = x.double()
    out = (xd @ read.t()).to(BF16).double()
    y = out[:, :n].index_add(1, layer.hi_rows.long(), out[:, n:]) + xd @ delta.double().t()
    y = y.float() * layer.scales
    return y if bias is None else y + bias


@pytest.mark.parametrize("m,dtype,heavy", [(1, BF16, 0), (5, BF16, 16), (3, torch.float32, 32),
                                           (2, torch.float32, None)])
def test_output_is_the_stated_rounding_of_exact_math(m, dtype, heavy):
    """``y = s·(bf16(x·C₄ᵀ) + bf16(x·Hiᵀ) + x·Δᵀ) + b``: with activations on a coarse grid
    every product and sum is exact in fp32, so the layer matches that formula (float64
    reference) bit for bit, with and without hi rows; with Gaussian activations it matches
    ``x @ Wᵀ`` to bf16 precision."""
    n, k = 64, 192
    codes = _codes(n, k, seed=m, far=0.02)
    scale = torch.tensor([0.0123], dtype=torch.float16)
    bias = torch.randn(n)
    layer = cpu_hptq.prepare_hptq_cpu(codes, scale, bias, max_sparse_fraction=1.0, heavy=heavy)
    assert layer is not None and layer.sparse_count + layer.hi_rows.numel() > 0
    if heavy is not None:
        assert layer.hi_rows.numel() == heavy
    c4, delta = _integer_weight(layer)
    assert torch.equal(c4 + delta, codes.float())
    gen = torch.Generator().manual_seed(7)
    x = (torch.randint(-16, 17, (m, k), generator=gen) / 8).to(dtype)  # 5-bit grid
    y = layer(x)
    assert y.dtype == dtype and torch.equal(y, _stated_output(layer, x, bias).to(dtype))
    xg = torch.randn(m, k, generator=gen).to(dtype)
    s = float(scale.float())
    exact = xg.double() @ (s * codes.double()).t() + bias.double()
    torch.testing.assert_close(layer(xg).double(), exact, rtol=0,
                               atol=2 ** -7 * float(exact.abs().max()))


def test_heavy_rows_get_hi_rows_and_stay_exact():
    """Rows holding many off-window codes (wide rows: here a quarter of the rows spread over
    ±60) go to hi rows — window nibble + a second nibble at scale 16 — and leave the sparse
    part; the chosen count minimizes the stated cost; the weight is still exactly the codes,
    and eager == compiled bit for bit (several scatter pieces of ``CHUNK`` entries)."""
    n, k = 128, 256
    gen = torch.Generator().manual_seed(3)
    codes = (torch.randn(n, k, generator=gen) * 2).round().long()
    codes[::4] = (torch.randn(n // 4, k, generator=gen) * 20).round().long()  # 32 wide rows
    codes[1::8, ::128] += 40  # light rows with two far codes each: sparse entries
    q, delta = split_codes(codes, window_offsets(codes, 256), 256)
    h = cpu_hptq.heavy_rows((delta != 0).sum(1), k)
    counts = (delta != 0).sum(1).sort(descending=True).values
    cost = {c: c * k + cpu_hptq.ENTRY_COST * int(counts[c:].sum())
            for c in (0, *cpu_hptq.HI_ROW_COUNTS) if c <= n}
    assert min(cost, key=cost.get) == h >= 32
    layer = cpu_hptq.prepare_hptq_cpu(codes, torch.tensor([0.01]), None,
                                      max_sparse_fraction=1.0)
    hi = set(layer.hi_rows.tolist())
    assert len(hi) == h and set(range(0, n, 4)) <= hi  # every wide row has a hi row
    light = torch.tensor([r not in hi for r in range(n)])
    assert int((delta[::4] != 0).sum()) > 1000 and layer.sparse_count == int(
        (delta[light] != 0).sum())  # only the other rows' entries are left
    c4, d = _integer_weight(layer)
    assert torch.equal(c4 + d, codes.float())
    wide = cpu_hptq.prepare_hptq_cpu(codes, torch.tensor([0.01]), None,
                                     max_sparse_fraction=1.0, heavy=0)
    assert wide.sparse_val.numel() > cpu_hptq.CHUNK  # several scatter pieces
    x = torch.randn(3, 1, k)
    for lay in (layer, wide):
        with torch.no_grad():
            eager = lay(x)
            compiled = torch.compile(lay, fullgraph=True)(x)
        assert torch.equal(compiled, eager)
        torch.testing.assert_close(eager.double(), x.double() @ (0.01 * codes.double()).t(),
                                   rtol=0, atol=2 ** -7 * float(eager.abs().max()))


def test_layer_with_no_off_window_codes():
    """Codes that all fit their windows: no hi rows, no sparse entries, the output is the
    kernel's alone (·s), eager and compiled."""
    gen = torch.Generator().manual_seed(5)
    codes = torch.randint(-8, 8, (32, 128), generator=gen) + torch.randint(
        -100, 100, (32, 1), generator=gen)  # one window per row, anywhere
    layer = cpu_hptq.prepare_hptq_cpu(codes, torch.tensor([0.5]), None)
    assert layer.hi_rows.numel() == 0 and layer.sparse_val.numel() == 0
    c4, delta = _integer_weight(layer)
    assert torch.equal(c4, codes.float()) and not delta.any()
    x = (torch.randint(-16, 17, (2, 128), generator=gen) / 8).to(BF16)
    y = layer(x)
    assert torch.equal(y, _stated_output(layer, x, None).to(BF16))
    with torch.no_grad():
        assert torch.equal(torch.compile(layer, fullgraph=True)(x), y)


def test_padding_does_not_change_the_output():
    """The zero entries padding the sparse part (to ``padded_length``) add exactly 0: the
    layer equals :func:`cpu_hptq.linear` on the unpadded entries, bit for bit."""
    codes = _codes(48, 128, seed=11, far=0.02)
    layer = cpu_hptq.prepare_hptq_cpu(codes, torch.tensor([0.02]), None,
                                      max_sparse_fraction=1.0, heavy=0)
    real = layer.sparse_val != 0
    assert 0 < int(real.sum()) < layer.sparse_val.numel()
    x = torch.randn(4, 128)
    unpadded = cpu_hptq.linear(x, layer.weight_int4pack, layer.scale_zero, layer.scales,
                               layer.hi_rows, layer.sparse_rows[real], layer.sparse_cols[real],
                               layer.sparse_val[real], None, layer.group_size, 128)
    assert torch.equal(layer(x), unpadded)


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


@pytest.mark.parametrize("heavy", [None, 0, 16])
def test_layout_built_in_row_chunks_equals_one_pass(monkeypatch, heavy):
    """The layout is built a few rows at a time (bounded memory for a 1B model's head): the
    same int4pack weight, scales/zeros, hi rows and sparse entries as in one pass."""
    codes = _codes(96, 256, seed=12, far=0.02)
    codes[5, :40] += 300  # far codes: some stay sparse even in a hi row
    s = torch.tensor([0.02])
    whole = cpu_hptq.build_layout(codes, s, max_sparse_fraction=1.0, heavy=heavy)
    monkeypatch.setattr(cpu_hptq, "LAYOUT_CHUNK", 256 * 7)  # 7 rows at a time
    chunked = cpu_hptq.build_layout(codes, s, max_sparse_fraction=1.0, heavy=heavy)
    assert len(whole) == len(chunked) == 7
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)
