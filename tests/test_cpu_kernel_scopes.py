"""babai-ao's own forwards (calibration, perplexity) do not depend on the CPU kernel mode.

Since the default CPU path rounds fp32 activations to bf16 (``babai_ao.kernels.cpu_int4``),
calibration and evaluation run inside ``cpu_int4.exact_forwards()``: their eager forwards take
the exact path, and no compiled graph is dropped. References: the same run under
``cpu_kernel("exact")`` (the process-wide switch), and the bf16-activation path itself.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from babai_ao.kernels import cpu_int4
from torch import nn

from babai_ao import cpu_kernel
from babai_ao.ao.tensor import BabaiQuantizedTensor
from babai_ao.calibration.blocks import decoder_blocks
from babai_ao.calibration.evaluate import perplexity
from babai_ao.calibration.sequential import quantize_model
from babai_ao.errors import BabaiError


def cfg() -> SimpleNamespace:
    return SimpleNamespace(bits=4, group_size=64, symmetric=False, order="act", clip=True,
                           damp=0.01)


def qdata(model: nn.Module) -> dict[str, torch.Tensor]:
    _, blocks = decoder_blocks(model)
    return {f"{i}.{n}": m.weight.qdata for i, b in enumerate(blocks)
            for n, m in b.named_modules() if isinstance(m, nn.Linear)}


@pytest.fixture(scope="module")
def calibrated(smollm2_small, calibration_small):
    """The 2-block fp32 SmolLM2, calibrated in the default mode and under ``exact``."""
    assert cpu_int4.MODE == "auto"
    default = copy.deepcopy(smollm2_small[0])
    quantize_model(default, cfg(), calibration_small, batch_size=2, progress=False)
    exact = copy.deepcopy(smollm2_small[0])
    with cpu_kernel("exact"):
        quantize_model(exact, cfg(), calibration_small, batch_size=2, progress=False)
    return default, exact


def test_sequential_codes_do_not_depend_on_the_cpu_kernel_mode(calibrated):
    """Stages after the first read earlier quantized linears' outputs: on the bf16 path
    those would differ, and so would the codes."""
    default, exact = calibrated
    a, b = qdata(default), qdata(exact)
    assert len(a) == 14
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # the default path is live outside calibration and would change those outputs
    w = default.model.layers[0].self_attn.q_proj.weight
    assert isinstance(w, BabaiQuantizedTensor) and w.cpu_int4pack_eligible()
    x = torch.randn(3, w.in_features)
    with cpu_kernel("exact"):
        ref = torch.nn.functional.linear(x, w)
    assert not torch.equal(torch.nn.functional.linear(x, w), ref)


def test_exact_forwards_is_eager_exact_and_keeps_compiled_graphs(calibrated):
    """Inside the scope eager F.linear is bit-exact vs the dequantized weight, a graph
    compiled before it keeps running (no ``torch.compiler.reset()``), and the scope nests
    and unwinds."""
    default, _ = calibrated
    lin = default.model.layers[1].mlp.down_proj
    w = lin.weight
    x = torch.randn(2, 5, w.in_features)
    compiled = torch.compile(lambda t: lin(t), fullgraph=True)
    before = compiled(x)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    exact = torch.nn.functional.linear(x, w.dequantize())
    with cpu_int4.exact_forwards():
        assert torch.equal(lin(x), exact)
        with cpu_int4.exact_forwards():
            assert torch.equal(lin(x), exact)
        assert torch.equal(lin(x), exact)
        assert torch.equal(compiled(x), before)  # the compiled (default-path) graph, kept
    assert torch.equal(lin(x), before)
    assert not torch.equal(before, exact)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames  # no recompile
    assert cpu_int4._exact_scopes == 0


def test_perplexity_is_exact_by_default(calibrated, smollm2_small):
    default, _ = calibrated
    ids = torch.randint(0, 1000, (2 * 64,), generator=torch.Generator().manual_seed(0))
    ppl = perplexity(default, ids, windows=2, seq_len=64, progress=False)
    with cpu_kernel("exact"):
        ref = perplexity(default, ids, windows=2, seq_len=64, progress=False, cpu_kernel="auto")
    fast = perplexity(default, ids, windows=2, seq_len=64, progress=False, cpu_kernel="auto")
    assert ppl == ref
    assert ppl != fast and math.isclose(ppl, fast, rel_tol=0.02)
    with pytest.raises(BabaiError, match="cpu_kernel"):
        perplexity(default, ids, windows=2, seq_len=64, progress=False, cpu_kernel="bf16")
