"""SSQR: nothing clipped (the stored form gives back Babai's unbounded codes exactly),
E ≤ B on every layer, searches on target, bits per weight = safetensors payload."""

from __future__ import annotations

import pytest
import torch
from _formats_util import REAL_LAYERS, random_problem, real_layers, safetensors_payload

from babai_ao import BabaiError, quantize_weight
from babai_ao.ao.ops import linear as babai_linear
from babai_ao.formats import outliers, ssqr


def reference_codes(w, h, sw: ssqr.SSQRWeight) -> torch.Tensor:
    """An independent unclipped nearest-plane pass on SSQR's stored grid."""
    qw = quantize_weight(w, h, bits=sw.bits, group_size=sw.group_size, clip=False,
                         order=sw.certificate.order, scales=sw.scales.float(),
                         zeros=sw.zero_points())
    return qw.codes.long()


def check_layer(w, h, sw: ssqr.SSQRWeight) -> None:
    n, k = w.shape
    codes = sw.codes()
    assert torch.equal(codes, reference_codes(w, h, sw))
    maxq = 2**sw.bits - 1
    # dense part = clamped code, outliers exactly where the code left [0, maxq]
    out_of_range = (codes < 0) | (codes > maxq)
    assert sw.csr.nnz == int(out_of_range.sum())
    assert torch.equal(sw.csr.dense((n, k)) != 0, out_of_range)
    # the certificate: nothing clipped, so Babai's bound holds, and E matches the weights
    cert = sw.certificate
    assert cert.clipped == 0 and cert.error <= cert.bound * (1 + 1e-6)
    # bits per weight = every stored byte = safetensors payload
    assert sw.nbytes == safetensors_payload(sw.tensors())
    assert cert.bits_per_weight == sw.bits_per_weight == 8 * sw.nbytes / (n * k)
    # babai::linear on the stored tensors = x @ (s·(q − z))ᵀ with the unbounded codes
    s = sw.scales.float().repeat_interleave(sw.group_size, 1)
    z = sw.zero_points().float().repeat_interleave(sw.group_size, 1)
    w_ref = s * (codes.float() - z)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(0))
    t = sw.tensors()
    y = babai_linear(x, t["packed"], t["scales"], t["zeros"], None, sw.bits, sw.group_size, k,
                     t["outlier_ptr"], t["outlier_idx"], t["outlier_val"])
    torch.testing.assert_close(y, x @ w_ref.T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits,m", [(2, 0.7), (3, 0.8), (3, 1.0), (4, 0.6)])
def test_random_layers_round_trip_and_bound(bits, m):
    w, h = random_problem(48, 192, seed=bits)
    sw = ssqr.quantize(w, h, bits, 64, multiplier=m, order="act")
    assert sw.csr.nnz > 0  # the test exercises outliers
    check_layer(w, h, sw)


def test_shrinking_the_grid_trades_bound_for_outliers():
    w, h = random_problem(32, 128, seed=5)
    runs = [ssqr.quantize(w, h, 3, 64, multiplier=m) for m in (1.0, 0.8, 0.6)]
    assert [r.csr.nnz for r in runs] == sorted(r.csr.nnz for r in runs)
    bounds = [r.certificate.bound for r in runs]
    assert bounds == sorted(bounds, reverse=True)


def test_unit_multiplier_is_the_min_max_grid():
    w, _ = random_problem(16, 128, seed=6)
    scale, zero = ssqr.shrunk_grid(w, 3, 64, 1.0)
    ref = quantize_weight(w, None, bits=3, group_size=64, static_groups=True)
    torch.testing.assert_close(scale, ref.scales.float(), rtol=0, atol=0)
    assert torch.equal(zero.long(), ref.zeros.long())


def test_csr_split_merge():
    gen = torch.Generator().manual_seed(7)
    codes = torch.randint(-40, 50, (9, 33), generator=gen)
    clamped, csr = outliers.split(codes, 0, 7)
    assert torch.equal(clamped, codes.clamp(0, 7))
    assert torch.equal(outliers.merge(clamped, csr), codes)
    assert csr.val.dtype == torch.int8 and csr.idx.dtype == torch.int16
    assert torch.equal(csr.ptr[1:] - csr.ptr[:-1], ((codes < 0) | (codes > 7)).sum(1).int())
    _, wide = outliers.split(torch.tensor([[0, 1000, -70000]]), 0, 3)
    assert wide.val.dtype == torch.int32 and wide.val.tolist() == [997, -70000]


@pytest.mark.parametrize("target", [3.5, 3.8])
def test_search_hits_target_bits(target):
    w, h = random_problem(64, 256, seed=8)
    sw = ssqr.quantize(w, h, 3, 64, target_bits=target)
    assert abs(sw.bits_per_weight - target) <= 0.01
    check_layer(w, h, sw)


def test_search_hits_outlier_density():
    w, h = random_problem(64, 256, seed=9)
    sw = ssqr.quantize(w, h, 3, 64, outlier_density=0.02)
    assert abs(sw.outlier_density - 0.02) <= 0.02 * 0.05 + 1 / w.numel()


def test_bad_requests_name_the_fix():
    w, h = random_problem(8, 64, seed=10)
    with pytest.raises(BabaiError, match="only one"):
        ssqr.quantize(w, h, 3, 64, target_bits=3.5, outlier_density=0.01)
    with pytest.raises(BabaiError, match="raise the target_bits"):
        ssqr.quantize(w, h, 3, 64, target_bits=2.0)  # below the dense 3-bit part alone
    with pytest.raises(BabaiError, match="outlier_density"):
        ssqr.quantize(w, h, 3, 64, outlier_density=1.5)
    with pytest.raises(BabaiError, match="divide"):
        ssqr.quantize(w, h, 3, 48)


@pytest.mark.model
def test_real_layers_bound_and_round_trip():
    layers = real_layers()
    for i in REAL_LAYERS:
        _name, w, h = layers[i]
        sw = ssqr.quantize(w, h, 3, 64, multiplier=0.85 if i % 2 else 1.0)
        check_layer(w, h, sw)
    _name, w, h = layers[0]  # q_proj of block 0
    sw = ssqr.quantize(w, h, 3, 64, target_bits=3.45)
    assert abs(sw.bits_per_weight - 3.45) <= 0.01
