"""Block tuning (babai_ao.calibration.tuning): scales, norms and biases tuned after the codes
are fixed; codes and stored bits unchanged, block output error down, certificates recomputed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from babai_ao import BabaiError, babai_config
from babai_ao.ao.hptq_tensor import HuffmanQuantizedTensor
from babai_ao.ao.tensor import BabaiQuantizedTensor
from babai_ao.calibration.batches import calibration_batches
from babai_ao.calibration.blocks import first_block_inputs, run_block
from babai_ao.calibration.sequential import decoder_blocks, quantize_model
from babai_ao.calibration.tuning import TuneSettings, _slice_windows

pytestmark = pytest.mark.model


def quantized(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach() for n, m in model.named_modules()
            if isinstance(getattr(m, "weight", None), (BabaiQuantizedTensor,
                                                       HuffmanQuantizedTensor))}


def integer_codes(w: torch.Tensor) -> torch.Tensor:
    """Signed HPTQ codes or grid codes (both tensor types have ``codes()``)."""
    return w.codes()


def block_output_error(float_model, model, calib) -> list[float]:
    """‖f_q(x) − f_float(x)‖² of each block on the quantized model's own block inputs,
    computed independently of the tuner (plain module calls)."""
    _, float_blocks = decoder_blocks(float_model)
    _, blocks = decoder_blocks(model)
    batches = calibration_batches(calib, 2)
    with torch.no_grad():
        inputs = first_block_inputs(model, blocks[0], batches)
        errors = []
        for fb, qb in zip(float_blocks, blocks):
            outs = [run_block(qb, inp) for inp in inputs]
            ref = [run_block(fb, inp) for inp in inputs]
            errors.append(sum(float((o - r).pow(2).sum()) for o, r in zip(outs, ref)))
            inputs = [(o, inp[1], inp[2]) for o, inp in zip(outs, inputs)]
    return errors


@pytest.fixture(scope="module")
def runs(smollm2_small, calibration_small):
    model, _ = smollm2_small
    out = {}
    for name, config in {"grid": babai_config(bits=3, group_size=64, order="act"),
                         "hptq": babai_config(clip="hptq", target_bits=3.3, order="act")}.items():
        plain = None
        if name == "grid":  # the untuned run to compare with (HPTQ: its certificate only)
            plain = copy.deepcopy(model)
            quantize_model(plain, config, calibration_small, batch_size=2, progress=False)
        tuned = copy.deepcopy(model)
        report = quantize_model(tuned, config, calibration_small, batch_size=2, progress=False,
                                tune=TuneSettings(steps=20, lr=5e-3, windows=1))
        out[name] = (plain, tuned, report)
    return out


@pytest.mark.parametrize("fmt", ["grid"])
def test_codes_and_bits_unchanged(runs, fmt):
    plain, tuned, _ = runs[fmt]
    a, b = quantized(plain), quantized(tuned)
    assert a.keys() == b.keys() and len(a) == 14
    for name in a:
        assert type(a[name]) is type(b[name])
        if name.startswith("model.layers.0."):  # later blocks see the tuned block's outputs
            assert torch.equal(integer_codes(a[name]), integer_codes(b[name])), name
        if fmt == "grid":  # HPTQ's stream length depends on the codes
            assert a[name].nbytes_stored == b[name].nbytes_stored
        assert a[name].scale.dtype == b[name].scale.dtype


@pytest.mark.parametrize("fmt", ["grid"])
def test_tuning_lowers_block_output_error(smollm2_small, calibration_small, runs, fmt):
    plain, tuned, _ = runs[fmt]
    model, _ = smollm2_small
    before = block_output_error(model, plain, calibration_small)
    after = block_output_error(model, tuned, calibration_small)
    # block 0 sees the same inputs in both models: tuning is kept only when it helps
    assert after[0] < before[0]
    assert sum(after) < sum(before)


def test_scales_moved_and_weight_is_scale_times_codes(runs):
    plain, tuned, _ = runs["grid"]
    a, b = quantized(plain), quantized(tuned)
    moved = sum(int((a[n].scale != b[n].scale).sum()) for n in a)
    assert moved > 0
    for _n, w in b.items():  # Ŵ = s·(q − z): dequantize agrees with the tuned scales
        s = w.scale.float().repeat_interleave(w.group_size, dim=1)
        zeros = w.zero_points().float().repeat_interleave(w.group_size, dim=1)
        assert torch.allclose(w.dequantize(torch.float32), s * (w.codes().float() - zeros))


def test_certificates_recomputed(smollm2_small, calibration_small, runs):
    """The tuned E equals tr(ΔHΔᵀ) computed here from the float weight and a reference H
    (block 0: its Hessians are those of the float model)."""
    model, _ = smollm2_small
    _, tuned, report = runs["grid"]
    assert report.tuning[0]["kept"]
    rows = {r.name: r for r in report.rows}
    block0 = [r for n, r in rows.items() if n.startswith("model.layers.0.")]
    assert all(r.error_babai is not None for r in block0)
    assert all(r.bound_holds or r.clipped for r in rows.values())
    name = "model.layers.0.self_attn.q_proj"
    w = dict(model.named_modules())[name].weight.detach().double()
    x_rows = []
    handle = dict(model.named_modules())[name].register_forward_pre_hook(
        lambda _m, a: x_rows.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=calibration_small)
    handle.remove()
    x = torch.cat(x_rows).double()
    h = x.T @ x
    w_hat = dict(tuned.named_modules())[name].weight.detach().dequantize(torch.float32).double()
    diff = w - w_hat
    error_undamped = float(((diff @ h) * diff).sum())
    assert rows[name].error_undamped == pytest.approx(error_undamped, rel=1e-3)
    assert rows[name].error_undamped != pytest.approx(rows[name].error_babai, rel=1e-6)
    cert = dict(tuned.named_modules())[name].weight.detach().certificate
    assert cert.error_undamped == pytest.approx(rows[name].error_undamped)
    assert "E tuned" in report.to_markdown()


def test_hptq_tuning_keeps_the_stream(runs):
    """HPTQ: one scale per tensor tuned; a kept block has new scales, the same Huffman
    stream bytes, and recomputed certificates; a rejected block is left exactly as it was."""
    _, tuned, report = runs["hptq"]
    weights = quantized(tuned)
    assert all(isinstance(w, HuffmanQuantizedTensor) for w in weights.values())
    for entry in report.tuning:
        rows = [r for r in report.rows if r.name.startswith(entry["block"] + ".")]
        if entry["kept"]:
            assert entry["mse_after"] < entry["mse_before"]
            assert all(r.error_babai is not None for r in rows)
        else:
            assert all(r.error_babai is None for r in rows)
    for w in weights.values():
        assert w.scale.numel() == 1 and w.certificate is not None


def test_slice_windows_picks_batch_rows():
    hidden = torch.randn(3, 5, 4)
    cache = torch.arange(5)
    inp = (hidden, (torch.randn(3, 5),), {"pos": (torch.randn(3, 5, 2), torch.randn(3, 5, 2)),
                                          "cache_position": cache, "mask": None})
    idx = torch.tensor([2, 0])
    h, args, kw = _slice_windows(inp, idx)
    assert torch.equal(h, hidden[idx]) and torch.equal(args[0], inp[1][0][idx])
    assert torch.equal(kw["pos"][1], inp[2]["pos"][1][idx])
    assert kw["cache_position"] is cache and kw["mask"] is None


def test_bad_settings():
    with pytest.raises(BabaiError, match="steps >= 0"):
        TuneSettings(steps=-1)
    with pytest.raises(BabaiError, match="lr > 0"):
        TuneSettings(steps=1, lr=0.0)
