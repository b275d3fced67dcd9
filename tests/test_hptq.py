"""HPTQ / HRTN: decoded codes are Babai's unbounded codes, E ≤ B on every layer, the rate
search lands within 0.01 bits, bits per weight = safetensors payload, the 8-bit compute form
(with CSR spill past int8) computes the same linear."""

from __future__ import annotations

import pytest
import torch
from _formats_util import REAL_LAYERS, random_problem, real_layers, safetensors_payload
from safetensors.torch import load_file, save_file

from babai_ao import BabaiError, quantize_weight
from babai_ao.ao.ops import linear as babai_linear
from babai_ao.formats import hptq


def reference_codes(w, h, hw: hptq.HPTQWeight, order: str = "natural") -> torch.Tensor:
    n = w.shape[0]
    qw = quantize_weight(w, h, bits=8, group_size=None, clip=False, order=order,
                         scales=hw.row_scales.float(), zeros=torch.zeros(n, 1))
    return qw.codes.long()


def check_layer(w, h, hw: hptq.HPTQWeight, order: str = "natural") -> torch.Tensor:
    n, k = w.shape
    codes = hw.codes()
    assert torch.equal(codes, reference_codes(w, h, hw, order))
    cert = hw.certificate
    assert cert.clipped == 0 and cert.error <= cert.bound * (1 + 1e-6)
    assert hw.nbytes == safetensors_payload(hw.tensors())
    assert cert.bits_per_weight == hw.bits_per_weight == 8 * hw.nbytes / (n * k)
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(1))
    args = hw.compute_form()
    y = babai_linear(x, args["packed"], args["scales"], args["zeros"], None, args["bits"],
                     args["group_size"], args["in_features"], args.get("outlier_ptr"),
                     args.get("outlier_idx"), args.get("outlier_val"))
    torch.testing.assert_close(y, x @ (hw.row_scales.float() * codes.float()).T,
                               rtol=1e-5, atol=1e-4)
    return codes


@pytest.mark.parametrize("target", [2.3, 3.3, 4.3])
def test_search_hits_target_and_round_trips(target):
    w, h = random_problem(96, 256, seed=int(target * 10))
    hw = hptq.quantize(w, h, target)
    assert abs(hw.bits_per_weight - target) <= 0.01
    check_layer(w, h, hw)


def test_per_row_scales_and_act_order():
    w, h = random_problem(64, 192, seed=11)
    hw = hptq.quantize(w, h, 3.0, per_row=True, order="act")
    assert hw.scales.shape == (64,)
    assert abs(hw.bits_per_weight - 3.0) <= 0.01
    check_layer(w, h, hw, order="act")


def test_hrtn_is_round_to_nearest_without_clipping():
    w, _ = random_problem(32, 128, seed=12, outlier_frac=0.02)
    hw = hptq.hrtn(w, 3.3)
    codes = hw.codes()
    s = hw.row_scales.float()
    assert torch.equal(codes, torch.round(w / s).long())  # independent: plain rounding
    assert abs(hw.bits_per_weight - 3.3) <= 0.01
    assert codes.abs().max() > 8  # outliers kept, not clipped to a 3-bit range


def test_codes_past_int8_spill_to_csr_exactly():
    w, h = random_problem(16, 128, seed=13, outlier_frac=0.01)
    step = float(w.abs().max()) / 400  # codes reach ±400: beyond int8
    hw = hptq.quantize(w, h, scale=step)
    codes = check_layer(w, h, hw)
    args = hw.compute_form()
    assert codes.abs().max() > 127 and "outlier_ptr" in args
    assert int(args["outlier_ptr"][-1]) == int(((codes < -128) | (codes > 127)).sum())


def test_safetensors_round_trip_decodes_the_same(tmp_path):
    w, h = random_problem(24, 128, seed=14)
    hw = hptq.quantize(w, h, 2.5, chunk=100)
    path = tmp_path / "layer.safetensors"
    save_file(hw.tensors(), str(path))
    back = hptq.HPTQWeight.from_tensors(load_file(str(path)), 24, 128)
    assert torch.equal(back.codes(), hw.codes())
    assert torch.equal(back.dequantize(), hw.dequantize())
    with pytest.raises(BabaiError, match="another layer"):
        hptq.HPTQWeight.from_tensors(load_file(str(path)), 24, 64)


def test_bad_requests_name_the_fix():
    w, h = random_problem(8, 64, seed=15)
    with pytest.raises(BabaiError, match="exactly one"):
        hptq.quantize(w, h)
    with pytest.raises(BabaiError, match="target_bits"):
        hptq.quantize(w, h, -1.0)


@pytest.mark.model
def test_real_layers_bound_round_trip_and_target():
    layers = real_layers()
    for i in REAL_LAYERS:
        _name, w, h = layers[i]
        hw = hptq.quantize(w, h, scale=float(w.std()) / 3)
        check_layer(w, h, hw)
    _name, w, h = layers[0]  # q_proj of block 0
    hw = hptq.quantize(w, h, 3.297)
    assert abs(hw.bits_per_weight - 3.297) <= 0.01
    check_layer(w, h, hw)


def test_babai_config_hptq_stores_the_stream_and_loads_decoded(tmp_path):
    import warnings

    from safetensors import safe_open
    from torchao.prototype.safetensors.safetensors_support import (
        flatten_tensor_state_dict,
        unflatten_tensor_state_dict,
    )
    from torchao.quantization import quantize_

    from babai_ao.ao.config import BabaiConfig, babai_config
    from babai_ao.ao.hptq_tensor import HuffmanQuantizedTensor, decode_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no Hessian: HRTN, warned once
        quantize_(model, babai_config(clip="hptq", target_bits=3.3))
    w = model[0].weight
    assert isinstance(w, HuffmanQuantizedTensor)
    assert abs(w.bits_per_weight - 3.3) <= 0.01
    x = torch.randn(4, 128)
    from babai_ao.kernels import cpu_int4

    with cpu_int4.exact_forwards():  # the exact path (the CPU default rounds x to bf16)
        y = model(x)
    ref = torch.nn.functional.gelu(x @ w.dequantize().T + model[0].bias)
    torch.testing.assert_close(y, ref @ model[2].weight.dequantize().T + model[2].bias)
    # the checkpoint holds the bitstream; its payload is the accounted bytes (+ float biases)
    tensors, metadata = flatten_tensor_state_dict(model.state_dict())
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    biases = sum(model[i].bias.numel() * 4 for i in (0, 2))
    stored = sum(model[i].weight.nbytes_stored for i in (0, 2))
    assert safetensors_payload(tensors) == stored + biases
    assert any(k.endswith("_weight_bitstream") for k in tensors)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    loaded, _ = unflatten_tensor_state_dict(load_file(str(path)), meta)
    fresh = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.GELU(),
                                torch.nn.Linear(64, 32))
    fresh.load_state_dict(loaded, assign=True)
    assert isinstance(fresh[0].weight, HuffmanQuantizedTensor)
    assert decode_model(fresh) == 2
    torch.testing.assert_close(fresh(x), y)
    assert fresh[0].weight.bits == 8  # decoded compute form: dense 8-bit path
    with pytest.raises(BabaiError, match="target_bits"):
        BabaiConfig(clip="hptq")


@pytest.mark.model
@pytest.mark.parametrize("mode", ["observe", "sequential"])
@pytest.mark.parametrize("clip", ["hptq", "ssqr"])
def test_quantize_model_with_no_clipping_formats(smollm2_small, calibration_small, clip, mode):
    """Both unclipped formats through ``quantize_model``, float-model (observe) and
    sequential Hessians alike: every layer holds the format, its certificate's E ≤ B, the
    report counts the stored bytes, HPTQ hits its budget."""
    import copy

    from babai_ao import quantize_model
    from babai_ao.ao.config import babai_config
    from babai_ao.ao.hptq_tensor import HuffmanQuantizedTensor
    from babai_ao.ao.tensor import BabaiQuantizedTensor

    model = copy.deepcopy(smollm2_small[0])
    model.model.layers = model.model.layers[:1]
    config = (babai_config(clip="hptq", target_bits=3.3, order="natural") if clip == "hptq"
              else babai_config(bits=3, group_size=64, clip="ssqr", order="natural"))
    report = quantize_model(model, config, calibration_small, mode=mode, progress=False)
    assert len(report.rows) == 7 and report.bound_checks() == (7, 7)
    kind = HuffmanQuantizedTensor if clip == "hptq" else BabaiQuantizedTensor
    weights = {f"model.layers.0.{n}": m.weight for n, m in model.model.layers[0].named_modules()
               if isinstance(m, torch.nn.Linear)}
    for row in report.rows:
        w = weights[row.name]
        assert isinstance(w, kind)
        assert row.bits_per_weight == w.bits_per_weight  # the report counts stored bytes
        if clip == "hptq":
            assert abs(row.bits_per_weight - 3.3) <= 0.01
