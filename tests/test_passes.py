"""Post-grad pass, float-weight checker, and compiled SmolLM2 with packed weights (CPU)."""

from __future__ import annotations

import pytest
import torch
from _kernels_util import random_layer, reference
from babai_ao.kernels.module import pack_linears
from babai_ao.passes import assert_no_float_weight, capture_post_grad
from torch._inductor.utils import run_and_get_code

from babai_ao.errors import BabaiError

LINEAR = "babai.linear.default"


def _targets(graph) -> list[str]:
    return [str(n.target) for n in graph.nodes if n.op == "call_function"]


def _compile(fn, *args):
    torch._dynamo.reset()
    with capture_post_grad() as graphs:
        out = torch.compile(fn, fullgraph=True)(*args)
    assert len(graphs) == 1
    return out, graphs[0]


LAYER = random_layer(4, 32, 40, 64, outliers=True, seed=1)
ARGS = [LAYER[k] for k in ("packed", "scales", "zeros", "bits", "group_size", "in_features",
                           "outlier_ptr", "outlier_idx", "outlier_val")]
BIAS = torch.randn(40)
PERM = torch.randperm(64)


def test_rewrite_folds_permutation_and_bias():
    def f(x):
        w = torch.ops.babai.dequantize(*ARGS)
        return torch.nn.functional.linear(x.index_select(-1, PERM), w) + BIAS

    x = torch.randn(2, 3, 64)
    out, graph = _compile(f, x)
    targets = _targets(graph)
    assert targets.count(LINEAR) == 1 and "babai.dequantize.default" not in targets
    assert not any(t.startswith(("aten.mm", "aten.addmm", "aten.add.", "aten.index"))
                   for t in targets)
    (node,) = [n for n in graph.nodes if str(n.target) == LINEAR]
    assert node.args[4] is not None and node.args[11] is not None  # bias, act_perm folded
    torch.testing.assert_close(out, reference(x, LAYER, BIAS, PERM), rtol=0, atol=1e-4)
    assert_no_float_weight(graph)


def test_rewrite_addmm_with_dtype_cast():
    def f(x):
        w = torch.ops.babai.dequantize(*ARGS, dtype=torch.bfloat16)
        return torch.nn.functional.linear(x, w.float(), BIAS)

    x = torch.randn(5, 64)
    out, graph = _compile(f, x)
    assert LINEAR in _targets(graph)
    assert_no_float_weight(graph)
    # fused result uses the exact weight (the eager one rounds it to bf16 first)
    torch.testing.assert_close(out, reference(x, LAYER, BIAS), rtol=0, atol=1e-4)


def test_checker_catches_a_weight_used_elsewhere():
    def f(x):
        w = torch.ops.babai.dequantize(*ARGS)
        return torch.nn.functional.linear(x, w), w.abs().sum()

    _, graph = _compile(f, torch.randn(5, 64))
    assert "babai.dequantize.default" in _targets(graph)  # kept: W has a second user
    with pytest.raises(AssertionError, match="float weight materialized"):
        assert_no_float_weight(graph)


def test_checker_catches_an_unpacking_decomposition():
    """Unpacking by hand (shifts, casts, multiply) is caught by data flow, not by op name."""
    packed, scales = LAYER["packed"], LAYER["scales"]

    def f(x):
        q = torch.stack([packed & 15, packed >> 4], -1).reshape(40, 64).float()
        w = q * scales.float().repeat_interleave(32, 1)
        y = torch.ops.babai.linear(x, *ARGS[:3], None, 4, 32, 64)
        return x @ w.t() + y

    _, graph = _compile(f, torch.randn(5, 64))
    with pytest.raises(AssertionError, match="computed from packed codes"):
        assert_no_float_weight(graph)


def test_checker_on_generated_code():
    def f(x):
        return torch.ops.babai.linear(x, *ARGS[:3], BIAS, *ARGS[3:])

    torch._dynamo.reset()
    out, (code,) = run_and_get_code(torch.compile(f, fullgraph=True), torch.randn(3, 64))
    assert "babai.linear" in code
    assert_no_float_weight(code, layers=[(40, 64)])
    bad = code + "\nbuf9 = empty_strided_cpu((40, 64), (64, 1), torch.float32)\n"
    with pytest.raises(AssertionError, match="quantized weight's shape"):
        assert_no_float_weight(bad, layers=[(40, 64)])
    with pytest.raises(BabaiError, match="layers"):
        assert_no_float_weight(code)


@pytest.mark.model
def test_compiled_smollm2_packed_4bit():
    from babai_ao.calibration.models import load_smollm2

    torch.manual_seed(0)
    model, _ = load_smollm2(num_layers=2)
    assert pack_linears(model, bits=4, group_size=64) == 14
    ids = torch.randint(0, 49152, (1, 12))
    with torch.no_grad():
        eager = model(ids).logits
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        with capture_post_grad() as graphs:  # fullgraph=True raises on any graph break
            compiled, (code,) = run_and_get_code(torch.compile(model, fullgraph=True), ids)
    assert not torch._dynamo.utils.counters["graph_break"]
    assert [t for g in graphs for t in _targets(g)].count(LINEAR) == 14
    assert code.count("torch.ops.babai.linear.default(") == 14
    for g in graphs:
        assert_no_float_weight(g)
    shapes = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
    assert_no_float_weight(code, layers=shapes)
    torch.testing.assert_close(compiled.logits, eager, rtol=1e-4, atol=1e-3)
