"""HPTQ on CPU at 4-bit speed (``babai_ao.kernels.cpu_hptq``, the C++ op
``babai_cpu::hptq_linear``): the window search against brute force, the split ``C = C₄ + Δ``
exactly, the prepared layer's weight recovered exactly from its layout (decoded in Python)
and from the kernel itself, its output against exact float math, the op's schema and fake
kernel, and ``prepare_cpu`` on real HPTQ models (eager, compiled, decoded form, save/load)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from babai_ao.kernels import cpp_ops, cpu_hptq
from babai_ao.kernels.cpu_hptq import (
    MAX_OFFSET,
    Int4SparseLinear,
    split_codes,
    window_offsets,
)

from babai_ao.ao.hptq_tensor import HuffmanQuantizedTensor, decode_model, prepare_hptq_cpu
from babai_ao.errors import BabaiError
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


def _unpacked(layer: Int4SparseLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Python decoding of the layout (independent of the kernel): ``(C₄ [N, K], the hi rows'
    weights 16·(hi − 8) scattered to their rows [N, K], Δ [N, K])``."""
    p = layer.parts
    k, n, h = layer.in_features, layer.out_features, p["hi_rows"].numel()
    b = p["blocks"]  # [R/32, K, 16]
    nib = torch.stack([b & 15, b >> 4], 2).permute(0, 2, 3, 1).reshape(-1, k).long()
    shift = p["offsets"].transpose(1, 2).reshape(-1, p["offsets"].shape[1]).long()
    w = nib + shift.repeat_interleave(layer.group_size, dim=1)
    assert not w[n + h:].any()  # padding rows hold nothing
    hi = torch.zeros(n, k, dtype=torch.long).index_add(0, p["hi_rows"].long(), 16 * w[n:n + h])
    delta = torch.zeros(n, k, dtype=torch.long)
    delta.index_put_((p["rows"].long(), p["cols"].long()), p["val"].long(), accumulate=True)
    return w[:n], hi, delta


def _kernel_weight(layer: Int4SparseLinear) -> torch.Tensor:
    """``C`` as the kernel computes it: the layer's op with x = I, scale 1, no bias (every
    sum is of integers, exact in fp32)."""
    p, n = layer.parts, layer.out_features
    unit = cpu_hptq.pack_layout(p["blocks"], p["offsets"], torch.ones(1), p["hi_rows"],
                                p["rows"], p["cols"], p["val"], n)
    return cpu_hptq.linear(torch.eye(layer.in_features), unit, None, n).t()


@pytest.mark.parametrize("n,k,per_row", [(48, 96, False), (64, 576, True), (32, 1536, False)])
def test_prepared_layer_is_exactly_the_dequantized_weight(n, k, per_row):
    """The layout decoded in Python (window nibbles + offsets, hi rows ×16, sparse entries)
    and the kernel's own reading with x = I are both the HPTQ codes, so s·C equals
    ``dequantize()`` bit for bit."""
    gen = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=gen) * 0.02
    w[torch.rand(n, k, generator=gen) < 0.003] *= 8  # heavy tail: some codes off the window
    hw = hptq.quantize(w, None, 3.3, per_row=per_row)
    layer = prepare_hptq_cpu(HuffmanQuantizedTensor.from_hptq(hw))
    assert isinstance(layer, Int4SparseLinear)
    assert layer.group_size == {96: 32, 576: 64, 1536: 256}[k]
    c4, hi, delta = _unpacked(layer)
    codes = hw.codes().long()
    assert torch.equal(c4 + hi + delta, codes)
    assert layer.parts["entries"] == int((delta != 0).sum())
    assert layer.parts["entries"] + int(hi.ne(0).sum()) > 0  # codes off their windows
    assert torch.equal(_kernel_weight(layer), codes.float())
    assert torch.equal(layer.parts["scales"].reshape(-1, 1) * codes.float(), hw.dequantize())


@pytest.mark.parametrize("m,dtype,heavy", [(1, BF16, 0), (5, BF16, 16), (3, torch.float32, 32),
                                           (2, torch.float32, None), (9, torch.float32, 16)])
def test_output_is_exact_math_rounded_once(m, dtype, heavy):
    """With activations on a coarse grid every partial sum of the kernel is exact in fp32,
    so ``y = fp32(fp32(s·(x·Cᵀ)) + b)`` bit for bit (float64 reference, hi rows and sparse
    entries included, 1–9 activation rows: the kernel's 4-row passes and their remainder);
    with Gaussian activations it matches float64 ``x @ Wᵀ`` within fp32 summation error
    (no bf16 rounding of ``x``)."""
    n, k = 64, 192
    codes = _codes(n, k, seed=m, far=0.02)
    scale = torch.tensor([0.0123], dtype=torch.float16)
    bias = torch.randn(n)
    layer = cpu_hptq.prepare_hptq_cpu(codes, scale, bias, max_sparse_fraction=1.0, heavy=heavy)
    assert layer is not None and layer.parts["entries"] + layer.parts["hi_rows"].numel() > 0
    if heavy is not None:
        assert layer.parts["hi_rows"].numel() == heavy
    gen = torch.Generator().manual_seed(7)
    x = (torch.randint(-16, 17, (m, k), generator=gen) / 8).to(dtype)  # 5-bit grid
    y = layer(x)
    exact = (x.double() @ codes.double().t()).float()  # integers/8: exact in fp32
    assert y.dtype == dtype
    assert torch.equal(y, (exact * scale.float() + bias).to(dtype))
    xg = torch.randn(m, k, generator=gen)
    s = float(scale.float())
    want = xg.double() @ (s * codes.double()).t() + bias.double()
    c4, hi, delta = _unpacked(layer)
    size = (xg.abs().double() @ (c4.abs() + 8 + hi.abs() + delta.abs()).double().t()) * s
    assert ((layer(xg).double() - want).abs() <= 2 * k * 2 ** -24 * size + 1e-6).all()


def test_op_schema_and_fake_kernel():
    """``torch.library.opcheck``: the C++ op's schema, fake kernel (shapes for compile) and
    dispatch agree, for fp32 and bf16 activations of rank 2 and 3; empty batches and
    non-contiguous activations work; a wrong buffer or width is refused in one line."""
    codes = _codes(64, 128, seed=4, far=0.02)
    layer = cpu_hptq.prepare_hptq_cpu(codes, torch.rand(64) + 0.5, torch.randn(64),
                                      max_sparse_fraction=1.0, heavy=16)
    for x in (torch.randn(3, 128), torch.randn(2, 5, 128).to(BF16)):
        torch.library.opcheck(torch.ops.babai_cpu.hptq_linear.default,
                              (x, layer.layout, layer.bias, layer.out_features))
    assert layer(torch.randn(0, 128)).shape == (0, 64)  # an empty batch
    assert layer(torch.randn(2, 0, 128).to(BF16)).shape == (2, 0, 64)
    x = torch.randn(3, 128)
    for dtype in (BF16, torch.float16):  # a bias in the model's dtype: widened, same result
        b = layer.bias.to(dtype)
        assert torch.equal(cpu_hptq.linear(x, layer.layout, b, 64),
                           cpu_hptq.linear(x, layer.layout, b.float(), 64))
    xt = torch.randn(128, 5).t()  # not contiguous
    torch.testing.assert_close(layer(xt), layer(xt.contiguous()), rtol=0, atol=0)
    x = torch.randn(2, 128)
    with pytest.raises(RuntimeError, match="wrong magic"):
        cpu_hptq.linear(x, torch.zeros_like(layer.layout), None, 64)
    with pytest.raises(RuntimeError, match="truncated"):
        cpu_hptq.linear(x, layer.layout[:-64].clone(), None, 64)
    with pytest.raises(RuntimeError, match="features"):
        cpu_hptq.linear(torch.randn(2, 96), layer.layout, None, 64)
    with pytest.raises(RuntimeError, match="out_features 32"):
        cpu_hptq.linear(x, layer.layout, None, 32)
    p = layer.parts
    with pytest.raises(BabaiError, match="out of range"):
        cpu_hptq.pack_layout(p["blocks"], p["offsets"], p["scales"], p["hi_rows"],
                             p["rows"] + 64, p["cols"], p["val"], 64)


def test_heavy_rows_get_hi_rows_and_stay_exact():
    """Rows holding many off-window codes (wide rows: here a quarter of the rows spread over
    ±60) go to hi rows — window nibble + a second nibble read ×16 — and leave the sparse
    part; the chosen count minimizes the stated cost; the weight is still exactly the codes,
    and eager == compiled bit for bit."""
    n, k = 128, 256
    gen = torch.Generator().manual_seed(3)
    codes = (torch.randn(n, k, generator=gen) * 2).round().long()
    codes[::4] = (torch.randn(n // 4, k, generator=gen) * 20).round().long()  # 32 wide rows
    codes[1::8, ::128] += 40  # light rows with two far codes each: sparse entries
    q, delta = split_codes(codes, window_offsets(codes, 256), 256)
    threads = torch.get_num_threads()
    h = cpu_hptq.heavy_rows((delta != 0).sum(1), k)
    counts = (delta != 0).sum(1).sort(descending=True).values
    step = 32 * threads
    cost = {c: -(-(n + c) // step) * step * k + cpu_hptq.ENTRY_COST * int(counts[c:].sum())
            for c in range(n + 1)}  # every count, brute force
    assert cost[h] == min(cost.values()) and h >= 32
    layer = cpu_hptq.prepare_hptq_cpu(codes, torch.tensor([0.01]), None,
                                      max_sparse_fraction=1.0)
    hi = set(layer.parts["hi_rows"].tolist())
    assert len(hi) == h and set(range(0, n, 4)) <= hi  # every wide row has a hi row
    light = torch.tensor([r not in hi for r in range(n)])
    assert int((delta[::4] != 0).sum()) > 1000 and layer.parts["entries"] == int(
        (delta[light] != 0).sum())  # only the other rows' entries are left
    c4, hi_w, d = _unpacked(layer)
    assert torch.equal(c4 + hi_w + d, codes) and torch.equal(_kernel_weight(layer),
                                                              codes.float())
    wide = cpu_hptq.prepare_hptq_cpu(codes, torch.tensor([0.01]), None,
                                     max_sparse_fraction=1.0, heavy=0)
    assert wide.parts["entries"] > 1000
    x = torch.randn(3, 1, k)
    for lay in (layer, wide):
        with torch.no_grad():
            eager = lay(x)
            compiled = torch.compile(lay, fullgraph=True)(x)
        assert torch.equal(compiled, eager)
        torch.testing.assert_close(eager.double(), x.double() @ (0.01 * codes.double()).t(),
                                   rtol=0, atol=1e-4 * float(eager.abs().max()))


def test_layer_with_no_off_window_codes():
    """Codes that all fit their windows: no hi rows, no sparse entries, the output is the
    window nibbles' alone (·s), eager and compiled."""
    gen = torch.Generator().manual_seed(5)
    codes = torch.randint(-8, 8, (32, 128), generator=gen) + torch.randint(
        -100, 100, (32, 1), generator=gen)  # one window per row, anywhere
    layer = cpu_hptq.prepare_hptq_cpu(codes, torch.tensor([0.5]), None)
    assert layer.parts["hi_rows"].numel() == 0 and layer.parts["entries"] == 0
    c4, hi, delta = _unpacked(layer)
    assert torch.equal(c4, codes) and not hi.any() and not delta.any()
    x = (torch.randint(-16, 17, (2, 128), generator=gen) / 8).to(BF16)
    y = layer(x)
    assert torch.equal(y, (0.5 * (x.double() @ codes.double().t())).to(BF16))
    with torch.no_grad():
        assert torch.equal(torch.compile(layer, fullgraph=True)(x), y)


def test_not_built_where_it_does_not_apply_or_pay(monkeypatch):
    codes = _codes(32, 128, seed=3)
    s = torch.tensor([0.01])
    odd = cpu_hptq.prepare_hptq_cpu(codes[:24], s, None)  # any N: padded to a whole block
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(0))
    want = x.double() @ (0.01 * codes[:24].double()).t()
    torch.testing.assert_close(odd(x).double(), want, rtol=0,
                               atol=1e-5 * float(want.abs().max()))  # fp32 sums
    assert cpu_hptq.prepare_hptq_cpu(codes[:, :72], s, None) is None  # no window group | K
    broad = _codes(32, 128, seed=3, spread=30.0)  # 8-bit-like codes: most off any window
    assert cpu_hptq.prepare_hptq_cpu(broad, s, None) is None
    assert cpu_hptq.prepare_hptq_cpu(broad, s, None, max_sparse_fraction=1.0) is not None
    monkeypatch.setattr(cpu_hptq, "ENABLED", False)
    assert cpu_hptq.prepare_hptq_cpu(codes, s, None) is None
    monkeypatch.setattr(cpu_hptq, "ENABLED", True)
    monkeypatch.setitem(cpp_ops._state, "ok", False)  # the C++ op could not be built
    assert cpu_hptq.prepare_hptq_cpu(codes, s, None) is None


@pytest.mark.model
@pytest.mark.filterwarnings("ignore:babai_config without calibration")
def test_prepare_cpu_on_smollm2_hptq(smollm2_small):
    """SmolLM2 block 0 (the one with the most off-window codes) at HPTQ 3.3 bits:
    ``prepare_cpu`` makes every linear an ``Int4SparseLinear`` (< 1 % of weights sparse);
    logits match the dequantized float model at bf16 precision; compiled (fullgraph, the
    C++ op in the graph) == eager; the decoded form prepares to the same layers;
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
        sparse = sum(m.parts["entries"] for m in layers)
        weights = sum(m.in_features * m.out_features for m in layers)
        assert 0 < sparse < 0.01 * weights
        eager = model(ids).logits
        compiled, code = run_and_get_code(torch.compile(model, fullgraph=True), ids)
        assert torch.equal(decoded(ids).logits, eager)
    assert "babai_cpu.hptq_linear" in "\n".join(code)
    torch.testing.assert_close(compiled.logits.float(), eager.float(), rtol=0,
                               atol=2 ** -7 * float(eager.abs().max()))
    torch.testing.assert_close(eager.float(), ref, rtol=0, atol=0.03 * float(ref.abs().max()))
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert not any("layout" in k for k in state)
    again.load_state_dict(state, assign=True)
    with torch.no_grad():
        prepare_cpu(again)
        assert torch.equal(again(ids).logits, eager)


@pytest.mark.parametrize("heavy", [None, 0, 16])
def test_layout_built_in_row_chunks_equals_one_pass(monkeypatch, heavy):
    """The layout is built a few rows at a time (bounded memory for a 1B model's head): the
    same nibble blocks, offsets, hi rows and sparse entries as in one pass."""
    codes = _codes(96, 256, seed=12, far=0.02)
    codes[5, :40] += 300  # far codes: some stay sparse even in a hi row
    s = torch.tensor([0.02])
    whole = cpu_hptq.build_layout(codes, s, max_sparse_fraction=1.0, heavy=heavy)
    monkeypatch.setattr(cpu_hptq, "LAYOUT_CHUNK", 256 * 7)  # 7 rows at a time
    chunked = cpu_hptq.build_layout(codes, s, max_sparse_fraction=1.0, heavy=heavy)
    assert len(whole) == len(chunked) == 1
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)


def test_no_compiler_warns_once_and_keeps_the_int8_path(monkeypatch):
    """Where the C++ op cannot be built (here: the build raises, as without g++), ``load`` is
    ``False`` with one warning naming the fix, layouts are declined (``prepare_cpu`` then
    keeps the int8 path), and ``BABAI_CPU_CPP=0`` turns the op off silently."""
    import warnings

    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension 'babai_cpu_ops': g++: not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setattr(cpp_ops, "_registered", lambda: False)  # as in a fresh process
    monkeypatch.setattr(cpp_ops, "_state", {})
    with pytest.warns(UserWarning, match="could not be built .*g\\+\\+: not found.*install a C"):
        assert cpp_ops.load() is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpp_ops.load() is False  # decided once: no second warning
        assert cpu_hptq.build_layout(_codes(32, 128, seed=1), torch.tensor([0.1])) is None
    monkeypatch.setattr(cpp_ops, "_state", {})
    monkeypatch.setenv("BABAI_CPU_CPP", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpp_ops.load() is False
