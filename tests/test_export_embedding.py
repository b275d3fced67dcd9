"""Quantized token embeddings (``babai_ao.ao.embedding``): eager, ExecuTorch and ONNX.

Eager: a lookup dequantizes only the gathered rows, with the same float operations as
``dequantize()``, so it equals the dequantized table's rows bit for bit (asserted against an
independent ``s·(q − z)`` built from the codes). Exports rebuild those rows exactly too
(``quantized_decomposed::embedding_*`` / ``GatherBlockQuantized`` / in-graph unpack, all
``(q − z)·s`` in float32), so the rest of the model differs from eager only by float
rounding: ``rounding_bound`` for weight-only, ``activation_bound`` for 8da4w (tolerances as
in ``test_export_executorch``). File sizes are held to 1.1× the stored bytes: codes + scales
+ zeros of every quantized tensor (the tied table counted once per module that uses it,
since runtimes store it in two layouts), float32 for the rest, plus the kernels' float32
scales / zero points of the embedding layout.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _export_util import accounted_bytes, activation_bound, cut_vocab, rounding_bound

from babai_ao import quantize_embeddings_
from babai_ao.ao.embedding import babai_embedding_config
from babai_ao.ao.tensor import BabaiQuantizedTensor
from babai_ao.errors import BabaiError

pytestmark = pytest.mark.usefixtures("exact_cpu_kernel")  # exact references

torch.set_num_threads(1)
V, D = 1024, 128


class TiedLM(torch.nn.Module):
    """``head(body(emb(ids)))`` with ``head.weight`` tied to ``emb.weight``."""

    def __init__(self, mid: bool = True, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(V, D)
        self.body = torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.GELU()) if mid \
            else torch.nn.Sequential()
        self.head = torch.nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.emb(ids)))


def _model(bits: int, group_size: int, symmetric: bool = False, mid: bool = True):
    return quantize_embeddings_(TiedLM(mid).eval(), bits=bits, group_size=group_size,
                                symmetric=symmetric)


def _bound(model: TiedLM, ids: torch.Tensor) -> torch.Tensor:
    """Rounding bound of the layers after the (exact) lookup."""
    with torch.no_grad():
        h = model.emb(ids)
    return rounding_bound(torch.nn.Sequential(*model.body, model.head), h)


def _layout_extra(w: BabaiQuantizedTensor) -> int:
    """Runtime layout of the table beyond ``nbytes_stored``: float32 scales (+2 bytes per
    group over fp16) and float32 zero points (4 bytes per group)."""
    return w.scale.numel() * (2 + 4)


# ---- eager ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bits, group_size, symmetric", [
    (4, 64, False), (4, 32, True), (8, 64, False), (2, 32, False), (3, 16, False)])
def test_lookup_equals_dequantized_rows(bits, group_size, symmetric):
    torch.manual_seed(1)
    table = torch.randn(300, 192)
    q = babai_embedding_config(bits, group_size, symmetric).quantize_table(table)
    assert isinstance(q, BabaiQuantizedTensor) and q.bits == bits
    ids = torch.randint(0, 300, (3, 11))
    got = torch.nn.functional.embedding(ids, q)
    # independent float reference: s·(q − z) from the unpacked codes, zeros and scales
    s = q.scale.float().repeat_interleave(group_size, 1)
    z = q.zero_points().float().repeat_interleave(group_size, 1)
    ref = (s * (q.codes().float() - z))[ids]
    assert got.dtype == torch.float32 and got.shape == (3, 11, 192)
    assert torch.equal(got, ref)
    assert torch.equal(got, q.dequantize()[ids])
    # round to nearest on a min-max grid: |E − Ê| ≤ s/2, plus the group's end points moved
    # by rounding s to fp16 (relative 2^-11, times up to 2^b steps)
    tol = s[ids] * (0.5 + 2.0 ** (bits - 11)) + 1e-7
    assert ((table[ids] - got).abs() <= tol).all()
    assert q.bits_per_weight == pytest.approx(bits + (16 + bits) / group_size, abs=0.01)


def test_tie_is_kept_and_no_float_table_remains():
    model = _model(4, 64)
    assert model.head.weight is model.emb.weight
    assert isinstance(model.emb.weight, BabaiQuantizedTensor)
    floats = [p for p in model.parameters() if not isinstance(p, BabaiQuantizedTensor)]
    assert max(p.numel() for p in floats) < V * D
    ids = torch.randint(0, V, (2, 7))
    w = model.emb.weight.dequantize()
    with torch.no_grad():
        got = model(ids)
        ref = torch.nn.functional.linear(model.body(w[ids]), w)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_untied_lm_head_quantized_too():
    model = TiedLM().eval()
    model.head.weight = torch.nn.Parameter(model.emb.weight.detach().clone() * 2)
    model.get_input_embeddings = lambda: model.emb
    model.get_output_embeddings = lambda: model.head
    quantize_embeddings_(model, bits=8, group_size=32)
    assert isinstance(model.head.weight, BabaiQuantizedTensor)
    assert model.head.weight is not model.emb.weight
    assert torch.allclose(model.head.weight.dequantize(), 2 * model.emb.weight.dequantize(),
                          atol=0.05)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(bits=5), "bits=5"),
    (dict(bits=True), "bits=True"),
    (dict(group_size=0), "positive"),
    (dict(group_size=48), "does not divide the embedding dimension 128"),
    (dict(group_size=256), "does not divide"),
])
def test_bad_bits_and_group_sizes(kwargs, needle):
    with pytest.raises(BabaiError, match=needle):
        quantize_embeddings_(TiedLM(), **kwargs)


def test_refuses_twice_and_max_norm():
    model = _model(4, 64)
    with pytest.raises(BabaiError, match="already quantized"):
        quantize_embeddings_(model)
    renorm = TiedLM()
    renorm.emb.max_norm = 1.0
    with pytest.raises(BabaiError, match="max_norm"):
        quantize_embeddings_(renorm)


def test_compile_matches_eager():
    model = _model(4, 64)
    ids = torch.randint(0, V, (1, 9))
    with torch.no_grad():
        assert torch.equal(torch.compile(model.emb)(ids), model.emb(ids))


# ---- ExecuTorch ----------------------------------------------------------------------------
def _pte(model, ids, tmp_path, mode):
    pytest.importorskip("executorch")
    from babai_ao.export import to_executorch
    from babai_ao.export.executorch import load_method, run_pte

    rep = to_executorch(model, (ids,), tmp_path / "m.pte", mode=mode)
    got = run_pte(load_method(rep.path), (ids,))[0]
    with torch.no_grad():
        ref = model(ids)
    return rep, got, ref


@pytest.mark.parametrize("bits, symmetric", [(4, False), (4, True), (8, False), (2, False),
                                             (3, False)])
def test_executorch_weight_only(tmp_path, bits, symmetric):
    """2/4/8 bit: quantized_decomposed kernels; 3 bit: the ATen gather + unpack."""
    model = _model(bits, 32, symmetric)
    ids = torch.randint(0, V, (2, 6))
    rep, got, ref = _pte(model, ids, tmp_path, "weight_only")
    err, bound = (got - ref).abs(), _bound(model, ids)
    assert (err <= bound).all(), f"max excess {(err - bound).max():.3g}"
    w = model.emb.weight
    assert rep.size_bytes <= 1.1 * (accounted_bytes(model) + _layout_extra(w))
    assert rep.size_bytes < accounted_bytes(model) + V * D * 4 / 2  # no float table


@pytest.mark.parametrize("symmetric", [True, False])
def test_executorch_8da4w_lm_head(tmp_path, symmetric):
    """The tied lm_head runs XNNPACK's int8-activation × int4 pattern; the lookup is exact."""
    model = _model(4, 32, symmetric, mid=False)
    ids = torch.randint(0, V, (2, 6))
    rep, got, ref = _pte(model, ids, tmp_path, "8da4w")
    w = model.emb.weight
    with torch.no_grad():
        x = model.emb(ids)
    sums = w.dequantize().abs().sum(1) if symmetric else 8 * 32 * w.scale.float().sum(1)
    bound = activation_bound(x, sums, w.dequantize())
    err = (got - ref).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max():.3g}"
    assert rep.max_abs_diff > 0
    # table (embedding kernel) + 4-bit codes and float scales inside the delegate
    assert rep.size_bytes <= 1.1 * (accounted_bytes(model) + _layout_extra(w)
                                    + w.scale.numel() * 2)


# ---- ONNX ----------------------------------------------------------------------------------
def _onnx_ops(path) -> list[str]:
    import onnx

    return [n.op_type for n in onnx.load(str(path)).graph.node]


def _largest_float(path) -> int:
    import onnx

    m = onnx.load(str(path))
    sizes = [int(np.prod(t.dims)) for t in m.graph.initializer if t.data_type == 1]
    sizes += [int(np.prod(a.t.dims)) for n in m.graph.node if n.op_type == "Constant"
              for a in n.attribute if a.name == "value" and a.t.data_type == 1]
    return max(sizes, default=0)


@pytest.mark.parametrize("bits, group_size, fmt, fused", [
    (4, 32, "qdq", True), (4, 64, "matmulnbits", True), (8, 32, "qdq", True),
    (2, 32, "matmulnbits", True), (3, 32, "qdq", False), (4, 8, "qdq", False)])
def test_onnx(tmp_path, bits, group_size, fmt, fused):
    """GatherBlockQuantized where it fits (2/4/8 bit, blocks a power of two ≥ 16), else a
    Gather of packed rows + in-graph unpack + DequantizeLinear; exact rows either way."""
    pytest.importorskip("onnxruntime")
    from babai_ao.export import to_onnx
    from babai_ao.export.onnx import ort_session, run_onnx

    model = _model(bits, group_size)
    ids = torch.randint(0, V, (2, 6))
    rep = to_onnx(model, (ids,), tmp_path / "m.onnx", format=fmt)
    got = run_onnx(ort_session(rep.path), (ids,))[0]
    with torch.no_grad():
        ref = model(ids)
    err, bound = (got - ref).abs(), _bound(model, ids)
    assert (err <= bound).all(), f"max excess {(err - bound).max():.3g}"
    ops = _onnx_ops(rep.path)
    assert ("GatherBlockQuantized" in ops) == fused
    assert _largest_float(rep.path) < V * D // 4, "a float table was stored"
    w = model.emb.weight
    assert rep.size_bytes <= 1.1 * (accounted_bytes(model) + _layout_extra(w))
    if fmt == "matmulnbits":  # the tied table's codes are stored once
        assert rep.size_bytes <= 1.1 * (accounted_bytes(model) - w.qdata.numel()
                                        + _layout_extra(w))


# ---- SmolLM2: greedy decoding ----------------------------------------------------------------
@pytest.fixture(scope="module")
def lm_emb4(smollm2_small):
    """2 blocks, vocabulary cut to 2048, decoder linears 4-bit g64, embedding 4-bit g64."""
    import copy

    from _export_util import quantize_linears

    model = cut_vocab(copy.deepcopy(smollm2_small[0]), 2048)
    quantize_linears(model.model.layers, 4, 64)
    quantize_embeddings_(model, bits=4, group_size=64)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


PROMPT, CACHE = [1, 504, 1000, 282, 2000, 314, 17, 99], 24


@pytest.mark.model
def test_smollm2_greedy_onnx_equals_eager(tmp_path, lm_emb4):
    pytest.importorskip("onnxruntime")
    from babai_ao.export.generate import greedy_eager, greedy_onnx
    from babai_ao.export.llm import export_llm_onnx

    ref = greedy_eager(lm_emb4, PROMPT, 8, CACHE)
    path = export_llm_onnx(lm_emb4, tmp_path / "lm.onnx", CACHE, format="qdq")
    assert "GatherBlockQuantized" in _onnx_ops(path)
    assert greedy_onnx(path, PROMPT, 8, CACHE) == ref


@pytest.mark.model
def test_smollm2_greedy_executorch_equals_eager(tmp_path, lm_emb4):
    pytest.importorskip("executorch")
    from babai_ao.export.generate import greedy_eager, greedy_executorch
    from babai_ao.export.llm import export_llm_executorch

    ref = greedy_eager(lm_emb4, PROMPT, 8, CACHE)
    path = export_llm_executorch(lm_emb4, tmp_path / "lm.pte", CACHE, xnnpack=False)
    assert greedy_executorch(path, PROMPT, 8, CACHE) == ref
