"""The nearest-plane core against independent references: textbook Babai, brute-force CVP,
RTN, hand calculation, and float math for the error identity and bound."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from babai_ao import BabaiError, HessianAccumulator, babai_nearest_plane, quantize_weight
from babai_ao.lattice.hessian import damped
from babai_ao.lattice.ldl import pivots, quantization_order

F64 = torch.float64


def ill_conditioned_hessian(n: int, log10_cond: float, seed: int) -> torch.Tensor:
    """``Q diag(λ) Qᵀ`` with eigenvalues log-spaced over ``10^log10_cond``."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    lam = torch.logspace(0, log10_cond, n, dtype=F64)
    return (q * lam) @ q.T


def explicit_babai_codes(w, h, scales, zeros, group_size, perm, lower=None, upper=None):
    """Codes from the textbook algorithm on the basis of ``S H S`` in reversed order."""
    n, k = w.shape
    codes = torch.empty(n, k, dtype=torch.int64)
    rev = torch.arange(k - 1, -1, -1)
    for row in range(n):
        s = scales[row].to(F64).repeat_interleave(group_size)
        z = zeros[row].to(F64).repeat_interleave(group_size)
        x = (w[row] / s + z)[perm]  # target in code coordinates, quantization order
        gram = (s[:, None] * h * s[None, :])[perm][:, perm]
        basis = torch.linalg.cholesky(gram).T  # columns b_j, BᵀB = gram
        lo = None if lower is None else torch.full((k,), float(lower), dtype=F64)
        hi = None if upper is None else torch.full((k,), float(upper), dtype=F64)
        c_rev = babai_nearest_plane(basis[:, rev], basis @ x, lo, hi)
        c = c_rev.flip(0)
        codes[row, perm] = c
    return codes


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    k=st.integers(2, 64),
    log10_cond=st.floats(0.0, 6.0),
    seed=st.integers(0, 2**31 - 1),
    order=st.sampled_from(["natural", "act", "min-pivot"]),
    clip=st.booleans(),
    bits=st.sampled_from([2, 3, 4, 8]),
    grouped=st.booleans(),
)
def test_gptq_form_equals_textbook_babai(k, log10_cond, seed, order, clip, bits, grouped):
    h = ill_conditioned_hessian(k, log10_cond, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(3, k, generator=gen, dtype=F64)
    divisors = [d for d in range(1, k + 1) if k % d == 0]
    g = divisors[len(divisors) // 2] if grouped else None
    qw = quantize_weight(w, h, bits=bits, group_size=g, order=order, clip=clip, damp=0.0,
                         dtype=F64, block_size=8, scale_dtype=F64)
    maxq = 2**bits - 1
    ref = explicit_babai_codes(w, h, qw.scales, qw.zeros, qw.group_size, qw.perm,
                               0 if clip else None, maxq if clip else None)
    assert torch.equal(qw.codes.to(torch.int64), ref)


def brute_force_cvp(gram: torch.Tensor, x: torch.Tensor, radius2: float) -> float:
    """min over integer c of (x−c)ᵀ G (x−c), searching the box that holds every point
    within ``radius2`` of ``x`` (|c_i − x_i| ≤ r·sqrt((G⁻¹)_ii))."""
    half = (radius2 * torch.linalg.inv(gram).diagonal()).sqrt()
    ranges = [range(math.floor(xi - hi), math.ceil(xi + hi) + 1)
              for xi, hi in zip(x.tolist(), half.tolist())]
    pts = torch.tensor(list(itertools.product(*ranges)), dtype=F64)
    diff = x[None] - pts
    return float(((diff @ gram) * diff).sum(1).min())


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 6), log10_cond=st.floats(0.0, 2.0), seed=st.integers(0, 2**31 - 1),
       order=st.sampled_from(["natural", "act", "min-pivot"]))
def test_babai_against_brute_force(k, log10_cond, seed, order):
    h = ill_conditioned_hessian(k, log10_cond, seed)
    gen = torch.Generator().manual_seed(seed + 7)
    w = torch.randn(1, k, generator=gen, dtype=F64) * 3
    scale = torch.full((1, 1), 0.5, dtype=F64)
    zero = torch.zeros(1, 1, dtype=F64)
    qw = quantize_weight(w, h, bits=2, group_size=None, order=order, clip=False, damp=0.0,
                         dtype=F64, scales=scale, zeros=zero, scale_dtype=F64)
    cert = qw.certificate
    # error identity: E = Σ d_j r_j², computed two independent ways
    assert cert.identity == pytest.approx(cert.error, rel=1e-6, abs=1e-12)
    diff = w - qw.dequantize(F64)
    assert cert.error == pytest.approx(float(diff @ h @ diff.T), rel=1e-9, abs=1e-12)
    assert cert.error <= cert.bound * (1 + 1e-9)
    # brute force in code coordinates: G = s² H, target w / s
    gram = 0.25 * h
    x = w[0] / 0.5
    radius2 = float(cert.error) / 1.0 + 1e-9
    best = brute_force_cvp(gram, x, radius2)
    assert best <= cert.error * (1 + 1e-9) + 1e-12


def reference_rtn(w: torch.Tensor, bits: int, g: int) -> torch.Tensor:
    """Plain per-group asymmetric min-max RTN (range widened to hold 0), fp16 scales."""
    maxq = 2**bits - 1
    wg = w.reshape(w.shape[0], -1, g)
    lo = wg.amin(-1, keepdim=True).clamp(max=0)
    hi = wg.amax(-1, keepdim=True).clamp(min=0)
    s = ((hi - lo) / maxq).half().float()
    z = torch.round(-lo / s).clamp(0, maxq)
    return (torch.round(wg / s) + z).clamp(0, maxq).reshape(w.shape).to(torch.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("order", ["natural", "act", "min-pivot"])
@pytest.mark.parametrize("explicit", [False, True])
def test_identity_hessian_is_rtn(bits, order, explicit):
    # hessian=None takes the rounding shortcut; an explicit I runs the nearest-plane loop
    torch.manual_seed(bits)
    w = torch.randn(48, 256)
    qw = quantize_weight(w, torch.eye(256) if explicit else None, bits=bits, group_size=64,
                         order=order)
    assert torch.equal(qw.codes, reference_rtn(w, bits, 64))
    assert qw.certificate.identity == pytest.approx(qw.error, rel=1e-4)


def test_one_and_two_dimensional_hand_calculations():
    # 1-D: w = 0.37 on the grid 0.25·Z, H = [2]: q = 0.25, r = 0.12, E = 2·0.12², B = ¼·2·0.25²
    qw = quantize_weight(torch.tensor([[0.37]], dtype=F64), torch.tensor([[2.0]], dtype=F64),
                         bits=4, group_size=None, clip=False, damp=0.0, dtype=F64,
                         scales=torch.tensor([[0.25]]), zeros=torch.tensor([[0.0]]),
                         scale_dtype=F64)
    assert qw.codes.item() == 1
    assert qw.error == pytest.approx(2 * 0.12**2)
    assert qw.bound == pytest.approx(0.25 * 2 * 0.25**2)
    # 2-D: H = [[2,1],[1,2]], w = [0.3, 0.3], unit grid. Step 0 rounds 0.3 -> 0 (d_0 = 3/2);
    # the error moves into column 1: 0.3 + 0.3·½ = 0.45 -> 0 (d_1 = 2). E = 1.5·0.09 + 2·0.2025
    h = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=F64)
    qw = quantize_weight(torch.tensor([[0.3, 0.3]], dtype=F64), h, bits=4, group_size=None,
                         clip=False, damp=0.0, dtype=F64, scales=torch.ones(1, 1),
                         zeros=torch.zeros(1, 1), scale_dtype=F64)
    assert qw.codes.tolist() == [[0, 0]]
    assert qw.certificate.pivots.tolist() == pytest.approx([1.5, 2.0])
    assert qw.error == pytest.approx(0.54)
    assert qw.certificate.identity == pytest.approx(0.54)


def test_no_clipping_bound_and_clipping_count():
    h = ill_conditioned_hessian(128, 3.0, 0).float()
    w = torch.randn(64, 128)
    free = quantize_weight(w, h, bits=3, group_size=32, order="act", clip=False)
    assert free.certificate.clipped == 0 and free.certificate.bound_holds
    assert free.certificate.identity == pytest.approx(free.error, rel=1e-4)
    clipped = quantize_weight(w, h, bits=3, group_size=32, order="act", clip=True)
    outside = (free.codes < 0) | (free.codes > 7)
    assert clipped.certificate.clipped > 0 and outside.any()
    assert clipped.codes.min() >= 0 and clipped.codes.max() <= 7
    # undamped error ≤ damped error (H0 ⪯ H0 + λI)
    assert free.certificate.error_undamped <= free.error


def test_min_pivot_is_pivoted_ldl_with_smallest_pivot_first():
    h = ill_conditioned_hessian(20, 3.0, 3)
    perm = quantization_order(h, "min-pivot")
    d = pivots(h[perm][:, perm])
    # eliminated in reverse quantization order: each pivot is the smallest Schur diagonal
    elim = perm.flip(0).tolist()
    for step in range(20):
        rest, done = elim[step:], elim[:step]
        schur = h[rest][:, rest]  # Schur complement of the eliminated block, by float math
        if done:
            b = h[rest][:, done]
            schur = schur - b @ torch.linalg.solve(h[done][:, done], b.T)
        schur = schur.diagonal()
        assert float(schur[0]) == pytest.approx(float(schur.min()), rel=1e-9)
        assert float(d.flip(0)[step]) == pytest.approx(float(schur[0]), rel=1e-8)
    act = quantization_order(h, "act")
    assert torch.equal(act, torch.argsort(h.diagonal(), descending=True, stable=True))


def test_float32_matches_float64():
    h = ill_conditioned_hessian(96, 2.0, 5)
    w = torch.randn(32, 96, dtype=F64)
    a = quantize_weight(w.float(), h.float(), bits=4, group_size=32, order="act")
    b = quantize_weight(w, h, bits=4, group_size=32, order="act", dtype=F64)
    assert (a.codes != b.codes).float().mean() < 0.01
    assert a.error == pytest.approx(b.error, rel=1e-3)


def test_dead_columns_are_zeroed_and_reported():
    x = torch.randn(500, 64)
    x[:, [3, 40]] = 0
    acc = HessianAccumulator(64)
    acc.add(x[:250])
    acc.add(x[250:])
    assert acc.tokens == 500
    torch.testing.assert_close(acc.hessian, x.T @ x, rtol=1e-4, atol=1e-3)
    w = torch.randn(16, 64)
    qw = quantize_weight(w, acc.hessian, bits=4, group_size=32)
    assert qw.certificate.dead_columns == [3, 40]
    assert torch.all(qw.dequantize()[:, [3, 40]] == 0)
    h, lam, dead = damped(acc.hessian, 0.01)
    live = acc.hessian.diagonal()[acc.hessian.diagonal() > 0]
    assert lam == pytest.approx(0.01 * float(live.mean()))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weight": torch.tensor([[float("nan"), 1.0]])}, "NaN/Inf"),
        ({"weight": torch.tensor([[float("inf"), 1.0]])}, "NaN/Inf"),
        ({"hessian": torch.tensor([[float("nan"), 0.0], [0.0, 1.0]])}, "NaN/Inf"),
        ({"hessian": torch.eye(3)}, "shape"),
        ({"weight": torch.randn(4)}, "2-D"),
        ({"weight": torch.randint(0, 3, (2, 2))}, "float"),
        ({"group_size": 3, "weight": torch.randn(2, 4), "hessian": torch.eye(4)}, "divide"),
        ({"bits": 5}, "unsupported bits"),
        ({"order": "random"}, "unknown order"),
        ({"damp": -1.0}, "negative"),
    ],
)
def test_bad_input_errors(kwargs, match):
    args = {"weight": torch.randn(2, 2), "hessian": torch.eye(2), "bits": 4,
            "group_size": None} | kwargs
    with pytest.raises(BabaiError, match=match):
        quantize_weight(args.pop("weight"), args.pop("hessian"), **args)


def test_singular_hessian_without_damping_says_how_to_fix():
    x = torch.randn(3, 8)  # rank 3 < 8 input features
    with pytest.raises(BabaiError, match="damp"):
        quantize_weight(torch.randn(4, 8), x.T @ x, bits=4, group_size=None, damp=0.0)
    # with the default damping the same Hessian works
    assert quantize_weight(torch.randn(4, 8), x.T @ x, bits=4, group_size=None).error >= 0


def test_babai_nearest_plane_on_orthogonal_basis_is_rounding():
    basis = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=F64))
    target = torch.tensor([[0.4, 2.9, -5.0]], dtype=F64)
    assert babai_nearest_plane(basis, target).tolist() == [[0, 1, -1]]


@pytest.mark.parametrize("k", [100, 576, 1536])
def test_tiled_hessian_is_xtx(k):
    """Upper tiles computed and mirrored: ``XᵀX`` in float64 up to float32 rounding, exactly
    symmetric; the same sums as the untiled accumulator up to rounding."""
    from babai_ao.lattice.hessian import hessian_tiles

    gen = torch.Generator().manual_seed(k)
    xs = [torch.randn(n, k, generator=gen) for n in (300, 77)]
    tiled = HessianAccumulator(k, tiles=max(2, hessian_tiles(k)))
    plain = HessianAccumulator(k)
    for x in xs:
        tiled.add(x)
        plain.add(x)
    ref = sum(x.double().T @ x.double() for x in xs)
    assert torch.equal(tiled.hessian, tiled.hessian.T)
    torch.testing.assert_close(tiled.hessian.double(), ref, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(plain.hessian, tiled.hessian, rtol=1e-5, atol=1e-3)
    assert tiled.tokens == plain.tokens == 377


@pytest.mark.parametrize("order", ["natural", "act"])
def test_rtn_in_row_chunks_equals_one_pass(monkeypatch, order):
    """Without a Hessian, rows are quantized in chunks above ``ROW_CHUNK`` weights (bounded
    memory for a 1B model's head): the same codes, scales and zeros as one pass, the
    certificate's sums added up."""
    from babai_ao.lattice import quantize as Q

    w = torch.randn(70, 96, generator=torch.Generator().manual_seed(3))
    whole = Q.quantize_weight(w, None, group_size=32, order=order)
    monkeypatch.setattr(Q, "ROW_CHUNK", 96 * 16)  # chunks of 16 rows, the last one of 6
    chunked = Q.quantize_weight(w, None, group_size=32, order=order)
    for f in ("codes", "scales", "zeros", "perm"):
        assert torch.equal(getattr(chunked, f), getattr(whole, f)), f
    for f in ("error", "identity", "bound"):
        assert getattr(chunked.certificate, f) == pytest.approx(getattr(whole.certificate, f),
                                                                rel=1e-6), f
    assert chunked.certificate.clipped == whole.certificate.clipped
    assert torch.equal(chunked.certificate.pivots, whole.certificate.pivots)


def test_hrtn_in_row_chunks_equals_one_pass(monkeypatch):
    """HRTN (HPTQ without a Hessian: explicit per-tensor scale, no clipping) also runs in
    row chunks above ``ROW_CHUNK`` weights — a 1B model's head took > 14 GB in one pass —
    with the same codes, stored bytes and certificate as one pass."""
    from babai_ao.formats import hptq
    from babai_ao.lattice import quantize as Q

    _stack = Q._stack_rows
    w = torch.randn(70, 96, generator=torch.Generator().manual_seed(4)) * 0.02
    whole = hptq.quantize(w, None, 3.3)
    stacked = []
    monkeypatch.setattr(Q, "ROW_CHUNK", 96 * 16)  # chunks of 16 rows, the last one of 6
    monkeypatch.setattr(Q, "_stack_rows", lambda parts: stacked.append(len(parts)) or
                        _stack(parts))
    chunked = hptq.quantize(w, None, 3.3)
    assert stacked and set(stacked) == {5}  # every rate-search step ran in 5 chunks
    assert torch.equal(chunked.codes(), whole.codes())
    assert chunked.bits_per_weight == whole.bits_per_weight
    assert torch.equal(chunked.scales, whole.scales)
    assert chunked.certificate.error == pytest.approx(whole.certificate.error, rel=1e-6)
    assert chunked.certificate.clipped == whole.certificate.clipped == 0
