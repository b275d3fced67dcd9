"""ExecuTorch export: the .pte runs in the ExecuTorch runtime and matches eager.

Tolerances (``_export_util``): weight-only rebuilds the very same float32 weight, so the
runtime differs from eager only by summation order — bounded elementwise by
``rounding_bound`` (twice γ_{K+2}·|x|·|W|ᵀ per linear, propagated through the chain);
8da4w rounds activations to int8 per token — bounded by ``activation_bound``.
"""

from __future__ import annotations

import pytest
import torch
from _export_util import (
    accounted_bytes,
    activation_bound,
    cut_vocab,
    mlp,
    quantize_linears,
    rounding_bound,
)
from babai_ao.export import to_executorch
from babai_ao.export.executorch import load_method, run_pte

from babai_ao.errors import BabaiError

pytestmark = pytest.mark.usefixtures("exact_cpu_kernel")  # exact references

pytest.importorskip("executorch")
torch.set_num_threads(1)


def _check(model, x, tmp_path, mode, bound):
    rep = to_executorch(model, (x,), tmp_path / "m.pte", mode=mode)
    got = run_pte(load_method(rep.path), (x,))[0]
    with torch.no_grad():
        ref = model(x)
    err = (got - ref).abs()
    assert torch.isfinite(got).all()
    assert (err <= bound).all(), f"max excess {(err - bound).max():.3g}"
    assert rep.max_abs_diff == pytest.approx(err.max().item(), abs=1e-12)
    return rep


def test_weight_only_mixed_bits_exact_and_small(tmp_path):
    """2/3/4/8-bit layers in one model: exact to rounding, file ≤ 1.1× the accounting."""
    model = quantize_linears(mlp((256, 512, 256, 512, 128)), [2, 3, 4, 8], 32)
    x = torch.randn(3, 256)
    rep = _check(model, x, tmp_path, "weight_only", rounding_bound(model, x))
    assert rep.quantized_linears == 4
    assert rep.size_bytes <= 1.1 * accounted_bytes(model)


def test_weight_only_ssqr_outliers(tmp_path):
    model = quantize_linears(mlp((512, 768, 256)), [3, 4], 64, outlier_density=0.02)
    assert all(m.weight.outlier_idx is not None and m.weight.outlier_idx.numel() > 0
               for m in model if isinstance(m, torch.nn.Linear))
    x = torch.randn(2, 512)
    rep = _check(model, x, tmp_path, "weight_only", rounding_bound(model, x))
    assert rep.size_bytes <= 1.1 * accounted_bytes(model)


def _group_abs_sum(w) -> torch.Tensor:
    """Σ_k |s[n, k//g]·(q − 8)| ≤ 8·g·Σ_g s[n, g]: the dense 8da4w weight's row sums."""
    return 8 * w.group_size * w.scale.float().sum(1)


@pytest.mark.parametrize("density", [None, 0.02])
def test_8da4w_within_activation_rounding(tmp_path, density):
    """Symmetric RTN (pure XNNPACK pattern) and asymmetric SSQR (zero correction + CSR)."""
    model = quantize_linears(mlp((256, 512)), 4, 32, symmetric=density is None,
                             outlier_density=density)
    x = torch.randn(4, 256)
    w = model[0].weight
    sums = w.dequantize().abs().sum(1) if density is None else _group_abs_sum(w)
    bound = activation_bound(x, sums, w.dequantize())
    rep = _check(model, x, tmp_path, "8da4w", bound)
    assert rep.max_abs_diff > 0  # activations really were quantized
    if density is None:  # 4-bit codes + fp16→fp32 scales inside the delegate
        assert rep.size_bytes <= 1.1 * (accounted_bytes(model) + w.scale.numel() * 2)


def test_8da4w_refuses_other_widths(tmp_path):
    model = quantize_linears(mlp((64, 32)), 3, 32)
    with pytest.raises(BabaiError, match="4-bit layers only"):
        to_executorch(model, (torch.randn(1, 64),), tmp_path / "m.pte", mode="8da4w")


@pytest.mark.model
def test_smollm2_greedy_decode_equals_eager(tmp_path):
    from babai_ao.export.generate import greedy_eager, greedy_executorch
    from babai_ao.export.llm import export_llm_executorch

    from babai_ao.calibration.models import load_smollm2

    model, _ = load_smollm2(num_layers=2)
    cut_vocab(model, 2048)  # the 49k×576 embedding dominates export time otherwise
    quantize_linears(model.model.layers, 4, 64)
    prompt, cache = [1, 504, 1000, 282, 2000, 314, 17, 99], 24
    ref = greedy_eager(model, prompt, 8, cache)
    path = export_llm_executorch(model, tmp_path / "lm.pte", cache, xnnpack=False)
    assert greedy_executorch(path, prompt, 8, cache) == ref


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_aten_unpack_matches_packing(bits):
    """The graph-side unpack (ATen integer ops) reads what ``packing.pack`` wrote."""
    from babai_ao.export.decompose import unpack_codes

    from babai_ao.formats.packing import pack

    codes = torch.randint(0, 2**bits, (5, 37))
    got = unpack_codes(pack(codes, bits), bits, 37)
    assert torch.equal(got, codes.to(torch.int32))


def test_outlier_rows_with_empty_rows():
    from babai_ao.export.decompose import outlier_rows

    counts = torch.tensor([0, 3, 0, 0, 2, 1, 0])
    ptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32)
    want = torch.repeat_interleave(torch.arange(7), counts)
    assert torch.equal(outlier_rows(ptr, int(counts.sum())), want)
