"""Coordinate descent after Babai (``refine``): never worse than Babai, never better than the
closest vector, locally optimal at convergence, grid kept, bound kept, config errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_core import F64, brute_force_cvp, ill_conditioned_hessian

from babai_ao import babai_config, quantize_weight
from babai_ao.errors import BabaiError
from babai_ao.lattice.refine import coordinate_descent


def error(w: torch.Tensor, qw, h: torch.Tensor) -> float:
    diff = w - qw.dequantize(F64)
    return float(((diff @ h) * diff).sum())


@settings(max_examples=30, deadline=None)
@given(k=st.integers(2, 6), log10_cond=st.floats(0.0, 3.0), seed=st.integers(0, 2**31 - 1),
       order=st.sampled_from(["natural", "act", "min-pivot"]))
def test_between_cvp_and_babai(k, log10_cond, seed, order):
    h = ill_conditioned_hessian(k, log10_cond, seed)
    w = torch.randn(2, k, generator=torch.Generator().manual_seed(seed + 3), dtype=F64) * 3
    fixed = dict(bits=2, group_size=None, order=order, clip=False, damp=0.0, dtype=F64,
                 scales=torch.full((2, 1), 0.5, dtype=F64), zeros=torch.zeros(2, 1, dtype=F64),
                 scale_dtype=F64)
    babai = quantize_weight(w, h, **fixed)
    refined = quantize_weight(w, h, refine=8, **fixed)
    assert refined.certificate.error <= babai.certificate.error * (1 + 1e-12) + 1e-12
    assert refined.certificate.error == pytest.approx(error(w, refined, h), rel=1e-9, abs=1e-12)
    assert refined.certificate.identity == pytest.approx(babai.certificate.error, rel=1e-9)
    assert refined.certificate.error <= refined.certificate.bound * (1 + 1e-9)
    for row in range(2):  # the closest vector (brute force) is a lower bound, row by row
        diff = w[row] - refined.dequantize(F64)[row]
        e_row = float(diff @ h @ diff)
        best = brute_force_cvp(0.25 * h, w[row] / 0.5, e_row + 1e-9)
        assert best <= e_row * (1 + 1e-9) + 1e-12


def test_local_optimum_and_grid():
    """At convergence no single code moved by ±1 (within the grid) lowers the error."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 24, generator=gen, dtype=F64) @ torch.randn(24, 24, generator=gen,
                                                                    dtype=F64)
    h = x.T @ x
    w = torch.randn(5, 24, generator=gen, dtype=F64)
    qw = quantize_weight(w, h, bits=3, group_size=8, order="act", damp=0.0, dtype=F64,
                         scale_dtype=F64, refine=50)
    assert int(qw.codes.min()) >= 0 and int(qw.codes.max()) <= 7
    base = error(w, qw, h)
    base_babai = quantize_weight(w, h, bits=3, group_size=8, order="act", damp=0.0,
                                 dtype=F64, scale_dtype=F64).certificate.error
    assert base < base_babai  # this lattice is not already at a coordinate-wise optimum
    codes = qw.codes.clone()
    for n in range(5):
        for j in range(24):
            for step in (-1, 1):
                c = int(codes[n, j]) + step
                if not 0 <= c <= 7:
                    continue
                qw.codes[n, j] = c
                assert error(w, qw, h) >= base * (1 - 1e-12)
                qw.codes[n, j] = codes[n, j]


def test_changes_stop_and_identity_with_h_identity():
    """With H = I rounding is already optimal: one sweep changes nothing."""
    w = torch.randn(4, 16, dtype=F64)
    qw = quantize_weight(w, torch.eye(16, dtype=F64), bits=4, group_size=8, damp=0.0,
                         dtype=F64, scale_dtype=F64)
    cols = torch.arange(16) // 8
    codes, changed = coordinate_descent(w, qw.codes, qw.scales.to(F64)[:, cols],
                                        qw.zeros.to(F64)[:, cols], torch.eye(16, dtype=F64),
                                        15, sweeps=3)
    assert changed == [0] and torch.equal(codes, qw.codes)


def test_config_refine_validation():
    assert babai_config(refine=2).refine == 2
    with pytest.raises(BabaiError, match="refine"):
        babai_config(refine=-1)
    with pytest.raises(BabaiError, match="refine"):
        babai_config(refine=True)
    with pytest.raises(BabaiError, match="refine"):
        babai_config(clip="hptq", target_bits=3.3, refine=1)
