"""One-λ bit allocation: the Lagrangian choice against brute force over every combination of
steps, the high-rate closed form, the Fisher probe against autograd, and the two-pass
quantization hitting the model's average bits with the certificate on every layer."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from babai_ao import BabaiError, babai_config
from babai_ao.calibration.allocation import (
    allocate_layer_bits,
    output_sensitivities,
    quantize_model_allocated,
)
from babai_ao.cli.runs import stored_bits_per_weight
from babai_ao.formats.allocation import RateCurve, allocate, choose, model_error

F64 = torch.float64


def synthetic_curves(seed: int, layers: int = 4, points: int = 6) -> list[RateCurve]:
    """Random layers with decreasing rates and increasing errors (not convex on purpose)."""
    gen = torch.Generator().manual_seed(seed)
    curves = []
    for i in range(layers):
        x = torch.arange(points, dtype=F64) * 0.5
        bits = 6 - torch.cumsum(torch.rand(points, generator=gen, dtype=F64) + 0.1, 0)
        err = torch.cumsum(torch.rand(points, generator=gen, dtype=F64) * 3 + 0.01, 0)
        curves.append(RateCurve(f"l{i}", int(torch.randint(10, 1000, (1,), generator=gen)),
                                float(torch.rand(1, generator=gen)) * 10 + 0.1, x, bits, err))
    return curves


def brute_force(curves: list[RateCurve], max_avg_bits: float) -> float:
    """Smallest Σ w_l E_l over every combination of points with average bits ≤ the cap."""
    n = sum(c.numel for c in curves)
    best = math.inf
    for combo in itertools.product(*[range(c.bits.numel()) for c in curves]):
        avg = sum(c.numel * float(c.bits[i]) for c, i in zip(curves, combo)) / n
        if avg <= max_avg_bits + 1e-12:
            best = min(best, sum(c.sensitivity * float(c.error[i]) for c, i in zip(curves,
                                                                                  combo)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_lagrangian_is_optimal_at_its_own_rate(seed):
    curves = synthetic_curves(seed)
    lo = sum(c.numel * float(c.bits.min()) for c in curves) / sum(c.numel for c in curves)
    hi = sum(c.numel * float(c.bits.max()) for c in curves) / sum(c.numel for c in curves)
    for budget in torch.linspace(lo, hi, 7, dtype=F64).tolist():
        alloc = allocate(curves, budget)
        assert alloc.avg_bits <= budget + 1e-9
        # no combination with at most this rate has a smaller weighted error
        assert alloc.loss == pytest.approx(brute_force(curves, alloc.avg_bits), rel=1e-9)
        # and choose() reproduces it: every layer minimizes w E + λ n R on its own
        again = choose(curves, alloc.lam)
        assert again.choice == alloc.choice


def test_close_to_the_budget_on_fine_curves():
    """On convex curves (as measured ones are: E ∝ s², bits ≈ h − log2 s) interpolated
    finely, the Lagrangian meets the budget closely and is no worse than the brute-force
    optimum over the coarse points at the budget itself."""
    gen = torch.Generator().manual_seed(7)
    curves = []
    for i in range(3):
        x = torch.linspace(-2, 2, 5, dtype=F64)
        c, h = float(torch.rand(1, generator=gen)) * 5 + 0.1, 3 + float(torch.rand(1,
                                                                             generator=gen))
        curves.append(RateCurve(f"l{i}", 100 * (i + 1), 1.0 + i, x,
                                h - x + 0.05 * x * x, c * 4.0**x))
    fine = [c.fine(per_octave=32) for c in curves]
    budget = 3.0
    alloc = allocate(fine, budget)
    assert budget - 0.01 <= alloc.avg_bits <= budget + 1e-9
    assert alloc.loss <= brute_force(curves, budget) * (1 + 1e-9)


def test_high_rate_closed_form():
    """E_l = c_l s², R_l = h_l − log2 s: the optimum spends bits so that w_l E_l / n_l is
    the same for every layer (d(w E)/dR = −2 ln2 · w E / n per weight)."""
    specs = [(100, 1.0, 3.0, 5.0), (400, 10.0, 0.5, 4.0), (50, 0.1, 20.0, 6.0)]
    curves = []
    for i, (n, w, c, h) in enumerate(specs):
        x = torch.linspace(-8, 2, 11, dtype=F64)
        curves.append(RateCurve(f"l{i}", n, w, x, h - x, c * (2.0 ** x) ** 2).fine(128))
    alloc = allocate(curves, 6.0)
    per_weight = [c.sensitivity * float(c.error[i]) / c.numel
                  for c, i in zip(curves, alloc.choice)]
    spread = max(per_weight) / min(per_weight)
    assert spread < 2 ** (2 / 128) * 1.02  # equal up to the grid's step
    assert alloc.avg_bits == pytest.approx(6.0, abs=0.02)


def test_curve_interpolation_and_errors():
    c = RateCurve("a", 10, 1.0, torch.tensor([0.0, 1.0, 3.0], dtype=F64),
                  torch.tensor([4.0, 3.0, 1.0], dtype=F64), torch.tensor([1.0, 4.0, 64.0],
                                                                         dtype=F64))
    f = c.fine(per_octave=2)
    for x, b, e in [(0.0, 4.0, 1.0), (1.0, 3.0, 4.0), (3.0, 1.0, 64.0), (0.5, 3.5, 2.0),
                    (2.0, 2.0, 16.0)]:
        i = int(torch.nonzero(f.log2_steps == x)[0])
        assert float(f.bits[i]) == pytest.approx(b) and float(f.error[i]) == pytest.approx(e)
    with pytest.raises(BabaiError, match="below the coarsest"):
        allocate([c], 0.5)
    with pytest.raises(BabaiError, match="ascending"):
        RateCurve("b", 1, 1.0, torch.tensor([1.0, 0.0]), torch.ones(2), torch.ones(2))
    assert model_error(2.0, 3, 6.0) == pytest.approx(4 * 3 * 6 / 12)


def tiny_llama(layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def test_fisher_probe_against_autograd():
    model = tiny_llama()
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    sens = output_sensitivities(model, ids, windows=4, batch_size=2)
    # reference: keep every linear's output, differentiate the summed loss w.r.t. them
    outs: dict[str, torch.Tensor] = {}
    named = {n: m for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}
    handles = [m.register_forward_hook(lambda _m, _a, o, n=n: outs.__setitem__(n, o))
               for n, m in named.items()]
    for p in model.parameters():
        p.requires_grad_(True)
    loss = model(input_ids=ids, labels=ids).loss * (ids.shape[0] * (ids.shape[1] - 1))
    grads = torch.autograd.grad(loss, [outs[n] for n in named])
    for h in handles:
        h.remove()
    tokens = ids.shape[0] * (ids.shape[1] - 1)
    for (name, _), g in zip(named.items(), grads):
        assert sens[name] == pytest.approx(float(g.double().pow(2).sum()) / tokens, rel=1e-4)
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_two_pass_quantization_hits_the_budget():
    model = tiny_llama(layers=1)
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(2))
    config = babai_config(clip="hptq", target_bits=3.0)
    report, bits = quantize_model_allocated(model, config, ids, batch_size=4,
                                            fisher_windows=4, progress=False)
    assert stored_bits_per_weight(model) == pytest.approx(3.0, abs=0.02)
    assert len(report.rows) == 7 and all(r.bound_holds for r in report.rows)
    for r in report.rows:  # every layer at its own target
        assert r.bits_per_weight == pytest.approx(bits.targets[r.name], abs=0.03)
    assert max(bits.targets.values()) - min(bits.targets.values()) > 0.3
    for p in bits.layers:  # the certificate's error model at the measured steps
        assert 0.7 < p.error_model_ratio < 1.3
    with pytest.raises(BabaiError, match="clip='hptq'"):
        allocate_layer_bits(model, babai_config(), ids)


def test_two_pass_quantization_passes_tuning_on():
    """``quantize_model_allocated(..., tune=...)``: the second pass tunes each block after its
    codes are fixed (it used to drop the option, so a "λ + tuning" P1 row silently repeated
    the λ row): a tuning log per block, the same codes and stored bits as without tuning."""
    from babai_ao.ao.hptq_tensor import HuffmanQuantizedTensor
    from babai_ao.calibration.tuning import TuneSettings

    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(2))
    config = babai_config(clip="hptq", target_bits=3.0)
    runs = {}
    for steps in (0, 3):
        model = tiny_llama(layers=1)
        report, _ = quantize_model_allocated(
            model, config, ids, batch_size=4, fisher_windows=4, progress=False,
            tune=TuneSettings(steps=steps, lr=1e-2) if steps else None)
        codes = {n: m.weight.codes() for n, m in model.named_modules()
                 if isinstance(getattr(m, "weight", None), HuffmanQuantizedTensor)}
        runs[steps] = (report, codes, stored_bits_per_weight(model))
    (plain, plain_codes, plain_bits), (tuned, tuned_codes, tuned_bits) = runs[0], runs[3]
    assert not plain.tuning and len(tuned.tuning) == 1  # one block, tuned
    assert tuned_codes.keys() == plain_codes.keys() and len(tuned_codes) == 7
    assert all(torch.equal(tuned_codes[n], plain_codes[n]) for n in plain_codes)
    assert tuned_bits == plain_bits


@pytest.mark.parametrize("tiles", [True, False])
def test_two_pass_quantization_passes_the_hessian_tiling_to_the_lambda_pass(monkeypatch, tiles):
    """``hessian_tiles=False`` means plain ``XᵀX`` for every Hessian of the run, the λ pass's
    included (it used to tile there whatever the option said)."""
    from babai_ao.calibration import allocation
    from babai_ao.lattice import hessian

    seen = []
    original = allocation.allocate_layer_bits

    def spy(*args, **kwargs):
        seen.append(hessian.default_tiles(1536))  # what a wide layer's accumulator would use
        return original(*args, **kwargs)

    monkeypatch.setattr(allocation, "allocate_layer_bits", spy)
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(2))
    quantize_model_allocated(tiny_llama(layers=1), babai_config(clip="hptq", target_bits=3.0),
                             ids, batch_size=4, fisher_windows=4, progress=False,
                             hessian_tiles=tiles)
    assert seen == [hessian.hessian_tiles(1536) if tiles else 1]
