"""ONNX export: the .onnx runs in onnxruntime, matches eager, and keeps weights quantized.

Tolerance: ``rounding_bound`` (``_export_util``) — the same float32 weight on both sides
(ORT's fused MatMulNBits dequantizes with its own rounding, covered by γ_{K+2}), so outputs
differ only by summation order, propagated through the Linear/GELU chain.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _export_util import accounted_bytes, cut_vocab, mlp, quantize_linears, rounding_bound
from babai_ao.export import to_onnx
from babai_ao.export.onnx import ort_session, run_onnx

from babai_ao.errors import BabaiError

pytestmark = pytest.mark.usefixtures("exact_cpu_kernel")  # exact references

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
torch.set_num_threads(1)

MIXED = (256, 512, 256, 512, 128)  # four linears at 2, 3, 4, 8 bits


def _weights(path) -> list[tuple[str, int, int]]:
    """(op/initializer kind, dtype, element count) of every stored tensor of the model."""
    m = onnx.load(str(path))
    out = [("init", t.data_type, int(np.prod(t.dims))) for t in m.graph.initializer]
    out += [("const", a.t.data_type, int(np.prod(a.t.dims))) for n in m.graph.node
            if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    return out


def _check(model, x, tmp_path, fmt):
    rep = to_onnx(model, (x,), tmp_path / "m.onnx", format=fmt)
    got = run_onnx(ort_session(rep.path), (x,))[0]
    with torch.no_grad():
        ref = model(x)
    bound = rounding_bound(model, x)
    err = (got - ref).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max():.3g}"
    assert rep.max_abs_diff == pytest.approx(err.max().item(), abs=1e-12)
    smallest = min(m.weight.shape.numel() for m in model if isinstance(m, torch.nn.Linear))
    floats = [n for kind, dt, n in _weights(rep.path) if dt == onnx.TensorProto.FLOAT]
    assert max(floats) < smallest, "a float tensor as large as a weight was stored"
    assert rep.size_bytes <= 1.1 * accounted_bytes(model)
    return rep


@pytest.mark.parametrize("fmt", ["qdq", "matmulnbits"])
def test_mixed_bits(tmp_path, fmt):
    model = quantize_linears(mlp(MIXED), [2, 3, 4, 8], 32)
    rep = _check(model, torch.randn(3, 256), tmp_path, fmt)
    ops = [n.op_type for n in onnx.load(str(rep.path)).graph.node]
    if fmt == "matmulnbits":
        assert ops.count("MatMulNBits") == 3  # 2, 4, 8 bit; 3 bit unpacked in the graph
    else:
        assert ops.count("DequantizeLinear") == 4
        types = {dt for _, dt, _ in _weights(rep.path)}
        assert onnx.TensorProto.UINT4 in types


@pytest.mark.parametrize("fmt", ["qdq", "matmulnbits"])
def test_ssqr_outliers(tmp_path, fmt):
    model = quantize_linears(mlp((512, 768, 256)), [3, 4], 64, outlier_density=0.02)
    rep = _check(model, torch.randn(2, 512), tmp_path, fmt)
    ops = [n.op_type for n in onnx.load(str(rep.path)).graph.node]
    assert ops.count("ScatterElements") >= 2 and "Gather" in ops


def test_unknown_format(tmp_path):
    model = quantize_linears(mlp((64, 32)), 4, 32)
    with pytest.raises(BabaiError, match="unknown ONNX format"):
        to_onnx(model, (torch.randn(1, 64),), tmp_path / "m.onnx", format="int4")


@pytest.mark.model
def test_smollm2_greedy_decode_equals_eager(tmp_path):
    from babai_ao.export.generate import greedy_eager, greedy_onnx
    from babai_ao.export.llm import export_llm_onnx

    from babai_ao.calibration.models import load_smollm2

    model, _ = load_smollm2(num_layers=2)
    cut_vocab(model, 2048)
    quantize_linears(model.model.layers, 4, 64)
    prompt, cache = [1, 504, 1000, 282, 2000, 314, 17, 99], 24
    ref = greedy_eager(model, prompt, 8, cache)
    path = export_llm_onnx(model, tmp_path / "lm.onnx", cache, format="qdq")
    assert greedy_onnx(path, prompt, 8, cache) == ref
