"""K-best back-substitution against brute-force closest vectors: never worse than Babai (row
by row), finds the closest vector at least as often, exact when the beam holds every path,
the certificate kept, and its arguments checked."""

from __future__ import annotations

import itertools

import pytest
import torch
from test_core import F64, brute_force_cvp, ill_conditioned_hessian

from babai_ao import BabaiError, babai_config, quantize_weight
from babai_ao.formats import hptq
from babai_ao.lattice.kbest import kbest_nearest_plane
from babai_ao.lattice.ldl import inverse_cholesky


def row_errors(w: torch.Tensor, qw, h: torch.Tensor) -> torch.Tensor:
    diff = w - qw.dequantize(F64)
    return ((diff @ h) * diff).sum(1)


def box_cvp(w_row: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
            maxq: int) -> float:
    """min over every code vector in [0, maxq]^K of the output error (exhaustive)."""
    k = w_row.numel()
    codes = torch.tensor(list(itertools.product(range(maxq + 1), repeat=k)), dtype=F64)
    diff = w_row[None] - scale * (codes - zero)
    return float(((diff @ h) * diff).sum(1).min())


@pytest.mark.parametrize("order", ["act", "min-pivot"])
def test_unclipped_against_brute_force(order):
    babai_hits = kbest_hits = 0
    for seed in range(25):
        k = 2 + seed % 5
        h = ill_conditioned_hessian(k, 2.5, seed)
        w = torch.randn(3, k, generator=torch.Generator().manual_seed(seed + 11), dtype=F64) * 3
        fixed = dict(bits=2, group_size=None, order=order, clip=False, damp=0.0, dtype=F64,
                     scales=torch.full((3, 1), 0.5, dtype=F64),
                     zeros=torch.zeros(3, 1, dtype=F64), scale_dtype=F64)
        babai = quantize_weight(w, h, **fixed)
        kb = quantize_weight(w, h, search="kbest", k=4, **fixed)
        eb, ek = row_errors(w, babai, h), row_errors(w, kb, h)
        assert bool((ek <= eb * (1 + 1e-12) + 1e-12).all())  # never worse, row by row
        assert kb.certificate.error == pytest.approx(float(ek.sum()), rel=1e-9)
        assert kb.certificate.error <= kb.certificate.bound * (1 + 1e-9)  # E ≤ B kept
        assert kb.certificate.identity == pytest.approx(babai.certificate.error, rel=1e-9)
        for row in range(3):
            best = brute_force_cvp(0.25 * h, w[row] / 0.5, float(eb[row]) + 1e-9)
            assert best <= float(ek[row]) * (1 + 1e-9) + 1e-12
            babai_hits += float(eb[row]) <= best * (1 + 1e-9) + 1e-12
            kbest_hits += float(ek[row]) <= best * (1 + 1e-9) + 1e-12
    assert kbest_hits >= babai_hits
    assert kbest_hits > babai_hits  # these lattices are hard enough for Babai to miss


def test_clipped_box_against_exhaustive_search():
    """On a 2-bit grid the box is part of the search: K-best ≤ Babai, ≥ the box optimum,
    and equal to it when the beam holds every path (k = 4^K, children spanning the box)."""
    babai_hits = kbest_hits = 0
    for seed in range(20):
        k = 3 + seed % 2
        h = ill_conditioned_hessian(k, 2.0, seed)
        w = torch.randn(2, k, generator=torch.Generator().manual_seed(seed), dtype=F64)
        base = dict(bits=2, group_size=None, order="act", damp=0.0, dtype=F64, scale_dtype=F64)
        babai = quantize_weight(w, h, **base)
        kb = quantize_weight(w, h, search="kbest", k=4, **base)
        assert int(kb.codes.min()) >= 0 and int(kb.codes.max()) <= 3
        eb, ek = row_errors(w, babai, h), row_errors(w, kb, h)
        assert bool((ek <= eb * (1 + 1e-12) + 1e-12).all())
        # the full beam: every path kept, so the result is the exhaustive optimum
        perm = kb.perm
        scale = kb.scales.to(F64).expand(2, k)[:, perm]
        zero = kb.zeros.to(F64).expand(2, k)[:, perm]
        upper = inverse_cholesky(h[perm][:, perm])
        _, _, full = kbest_nearest_plane(w[:, perm], upper, scale, zero, 3, k=4**k,
                                         children=7)
        for row in range(2):
            best = box_cvp(w[row], h, kb.scales.to(F64)[row], kb.zeros.to(F64)[row], 3)
            assert float(full[row]) == pytest.approx(best, rel=1e-9, abs=1e-12)
            assert best <= float(ek[row]) * (1 + 1e-9) + 1e-12
            babai_hits += float(eb[row]) <= best * (1 + 1e-9) + 1e-12
            kbest_hits += float(ek[row]) <= best * (1 + 1e-9) + 1e-12
    assert kbest_hits >= babai_hits


def test_beam_of_one_is_babai():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(300, 40, generator=gen, dtype=F64) @ torch.randn(40, 40, generator=gen,
                                                                    dtype=F64)
    h = x.T @ x
    w = torch.randn(6, 40, generator=gen, dtype=F64)
    qw = quantize_weight(w, h, bits=3, group_size=8, order="act", damp=0.01, dtype=F64,
                         scale_dtype=F64, block_size=16)
    hd = h + 0.01 * h.diagonal().mean() * torch.eye(40, dtype=F64)
    perm = qw.perm
    cols = perm // 8
    codes, resid, err = kbest_nearest_plane(
        w[:, perm], inverse_cholesky(hd[perm][:, perm]), qw.scales.to(F64)[:, cols],
        qw.zeros.to(F64)[:, cols], 7, k=1, children=1, block_size=7)
    assert torch.equal(codes.to(torch.int32), qw.codes[:, perm])
    assert float(err.sum()) == pytest.approx(qw.certificate.identity, rel=1e-9)


def test_larger_layer_blocks_and_gain():
    """Several column blocks, many rows: same result for any block size, below Babai."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(400, 48, generator=gen, dtype=F64) @ torch.randn(48, 48, generator=gen,
                                                                    dtype=F64)
    h = x.T @ x
    w = torch.randn(20, 48, generator=gen, dtype=F64)
    kw = dict(bits=3, group_size=16, order="min-pivot", damp=0.01, dtype=F64,
              scale_dtype=F64)
    babai = quantize_weight(w, h, **kw)
    kb = quantize_weight(w, h, search="kbest", k=8, **kw)
    assert kb.certificate.error < 0.97 * babai.certificate.error
    perm = kb.perm
    hd = h + 0.01 * h.diagonal().mean() * torch.eye(48, dtype=F64)
    upper = inverse_cholesky(hd[perm][:, perm])
    cols = perm // 16
    s, z = kb.scales.to(F64)[:, cols], kb.zeros.to(F64)[:, cols]
    outs = [kbest_nearest_plane(w[:, perm], upper, s, z, 7, k=8, block_size=b)
            for b in (5, 16, 48)]
    for c, _, e in outs[1:]:
        assert torch.equal(c, outs[0][0]) and torch.allclose(e, outs[0][2])


def test_hptq_kbest_hits_the_rate_with_less_error():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(600, 64, generator=gen) @ torch.randn(64, 64, generator=gen)
    h = x.T @ x
    w = torch.randn(48, 64, generator=gen) * 0.05
    babai = hptq.quantize(w, h, 3.3, order="act")
    kb = hptq.quantize(w, h, 3.3, order="act", search="kbest", k=8)
    assert abs(kb.bits_per_weight - 3.3) <= 0.02
    assert kb.certificate.error < babai.certificate.error
    assert kb.certificate.error <= kb.certificate.bound
    diff = w - kb.dequantize()
    assert kb.certificate.error == pytest.approx(float(((diff @ (h + 0.01 * h.diagonal()
                                                  .mean() * torch.eye(64))) * diff).sum()),
                                                 rel=1e-3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(search="beam"), "search='beam' is unknown"),
    (dict(search="kbest", k=0), "k=0 must be an integer"),
    (dict(search="kbest", order="natural", group_size=8), "needs grids fixed up front"),
])
def test_bad_arguments(kwargs, match):
    w = torch.randn(4, 16)
    h = torch.eye(16) + 0.1
    with pytest.raises(BabaiError, match=match):
        quantize_weight(w, h, **{"group_size": 8, **kwargs})


@pytest.mark.parametrize("kwargs, match", [
    (dict(search="beam"), "search='beam' is unknown"),
    (dict(search="kbest", k=0), "k=0 must be"),
    (dict(search="kbest", clip="ssqr", target_bits=3.4), "SSQR's outlier search"),
    (dict(search="kbest", order="natural"), "needs grids fixed up front"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(BabaiError, match=match):
        babai_config(**kwargs)
