"""babai_config: validation, serialization, quantize_ without calibration, observe/convert."""

from __future__ import annotations

import warnings

import pytest
import torch
from torchao.core.config import config_from_dict, config_to_dict
from torchao.quantization import quantize_
from transformers import TorchAoConfig

from babai_ao import BabaiError, quantize_weight
from babai_ao.ao.config import BabaiConfig, babai_config
from babai_ao.ao.tensor import BabaiQuantizedTensor
from babai_ao.lattice.grid import dequantize as grid_dequantize

pytestmark = pytest.mark.usefixtures("exact_cpu_kernel")  # exact references


def mlp(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.GELU(),
                               torch.nn.Linear(64, 32)).eval()


@pytest.mark.parametrize("kwargs, match", [
    ({"bits": 5}, "bits"),
    ({"bits": True}, "bits"),
    ({"group_size": 0}, "group_size"),
    ({"group_size": 12.5}, "group_size"),
    ({"order": "random"}, "order"),
    ({"clip": "maybe"}, "clip"),
    ({"clip": 1}, "clip"),
    ({"damp": -0.1}, "damp"),
    ({"step": "calibrate"}, "step"),
    ({"block_size": 0}, "block_size"),
    ({"target_bits": 3.5}, "no-clipping"),
    ({"clip": "ssqr", "target_bits": 3.5, "outlier_density": 0.01}, "not both"),
    ({"clip": "ssqr", "symmetric": True}, "symmetric"),
])
def test_bad_configs_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(BabaiError, match=match):
        babai_config(**kwargs)


def test_config_serializes_through_torchao_and_transformers() -> None:
    cfg = babai_config(bits=3, group_size=64, clip="ssqr", outlier_density=0.02, order="min-pivot")
    assert config_from_dict(config_to_dict(cfg)) == cfg
    hf = TorchAoConfig.from_dict(TorchAoConfig(quant_type=cfg).to_dict())
    assert hf.quant_type == cfg
    assert babai_config(group_size=-1).group_size is None


def test_quantize_without_calibration_is_rtn_and_warns_once() -> None:
    model, ref = mlp(), mlp()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize_(model, babai_config(bits=4, group_size=32))
    assert sum("no Hessian was observed" in str(w.message) for w in caught) == 1
    x = torch.randn(6, 128)
    h = torch.nn.functional.gelu(x @ _rtn(ref[0].weight).T + ref[0].bias)
    expected = h @ _rtn(ref[2].weight).T + ref[2].bias
    for i in (0, 2):
        assert isinstance(model[i].weight, BabaiQuantizedTensor)
        assert torch.equal(model[i].weight.dequantize(), _rtn(ref[i].weight))
    torch.testing.assert_close(model(x), expected)


def _rtn(w: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest on min-max groups of 32 (independent of quantize_weight)."""
    wg = w.detach().reshape(-1, 32)
    lo, hi = wg.amin(1).clamp(max=0), wg.amax(1).clamp(min=0)
    s = ((hi - lo) / 15).to(torch.float16).float()
    z = torch.round(-lo / s).clamp(0, 15)
    q = (torch.round(wg / s[:, None]) + z[:, None]).clamp(0, 15)
    return ((q - z[:, None]) * s[:, None]).reshape(w.shape)


def test_observe_then_convert_uses_the_observed_hessian() -> None:
    model, ref = mlp(), mlp()
    cfg = dict(bits=3, group_size=32, order="act")
    quantize_(model, babai_config(step="observe", **cfg))
    xs = [torch.randn(5, 128), torch.randn(7, 128)]
    with torch.no_grad():
        for x in xs:
            torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)  # observing is exact
        h0 = sum(x.T @ x for x in xs)
        a = torch.nn.functional.gelu(torch.cat(xs) @ ref[0].weight.T + ref[0].bias)
        h2 = a.T @ a
    quantize_(model, babai_config(step="convert", **cfg))
    for i, h in ((0, h0), (2, h2)):
        w = model[i].weight
        assert isinstance(w, BabaiQuantizedTensor) and not model[i]._forward_pre_hooks
        assert not hasattr(model[i], "babai_hessian")
        qw = quantize_weight(ref[i].weight.detach(), h, **cfg)
        assert torch.equal(w.codes(), qw.codes.long())
        assert w.certificate.error == pytest.approx(qw.certificate.error, rel=1e-4)
    x = torch.randn(3, 128)
    h = torch.nn.functional.gelu(x @ model[0].weight.dequantize().T + ref[0].bias)
    torch.testing.assert_close(model(x), h @ model[2].weight.dequantize().T + ref[2].bias)


def test_observe_convert_misuse_raises() -> None:
    model = mlp()
    with pytest.raises(BabaiError, match="never observed"):
        quantize_(model, babai_config(step="convert"))
    model = mlp()
    quantize_(model, babai_config(step="observe", group_size=32))
    with pytest.raises(BabaiError, match="already being observed"):
        quantize_(model, babai_config(step="observe", group_size=32))
    with pytest.raises(BabaiError, match="saw no data"):
        quantize_(model, babai_config(step="convert", group_size=32))
    model = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, babai_config(group_size=32))
        with pytest.raises(BabaiError, match="already quantized"):
            quantize_(model, babai_config(group_size=32))
    with pytest.raises(BabaiError, match="does not divide"):
        quantize_(mlp(), babai_config(group_size=48))


def test_no_clipping_formats() -> None:
    model, ref = mlp(), mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, babai_config(bits=3, group_size=32, clip="ssqr", outlier_density=0.02))
    w = model[0].weight
    assert w.outlier_idx is not None and w.outlier_idx.numel() > 0
    # outliers are stored bytes: bits/weight above the dense 3 + (16+3)/32
    assert w.bits_per_weight > 3 + 19 / 32
    x = torch.randn(4, 128)
    h = torch.nn.functional.gelu(x @ w.dequantize().T + ref[0].bias)
    torch.testing.assert_close(model(x), h @ model[2].weight.dequantize().T + ref[2].bias)
    with pytest.raises(BabaiError, match="Huffman"):
        BabaiConfig(clip="hptq").quantize_tensor(torch.randn(8, 128))
    with pytest.raises(BabaiError, match="clip=True"):  # plain packing cannot hold the excess
        BabaiConfig(bits=2, group_size=32, clip=False).quantize_tensor(
            torch.randn(16, 128), _hessian())


def _hessian() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(512, 128, generator=gen) @ (torch.eye(128) + 0.3 * torch.randn(128, 128, generator=gen))
    return x.T @ x


def test_grid_reference_matches_tensor() -> None:
    """The tensor's dequantize() equals the grid formula on the quantizer's own codes."""
    w = torch.randn(16, 128)
    qw = quantize_weight(w, _hessian(), bits=4, group_size=32, order="act")
    t = BabaiConfig(bits=4, group_size=32).quantize_tensor(w, _hessian())
    assert torch.equal(t.dequantize(), grid_dequantize(qw.codes, qw.scales.float(), qw.zeros, 32))
