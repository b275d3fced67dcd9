"""quantize_model beyond Llama: GPT-2 (Conv1D), BERT (encoder, padded calibration), generic
block discovery, and the report of what stayed float. Tiny random-weight models from configs."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, BertConfig, BertForMaskedLM
from transformers.pytorch_utils import Conv1D

from babai_ao import BabaiError, HessianAccumulator, babai_config, quantize_weight
from babai_ao.ao.reference import dequantized_model
from babai_ao.ao.tensor import BabaiQuantizedTensor
from babai_ao.calibration.discovery import find_blocks
from babai_ao.calibration.layers import is_quantizable, weight_matrix
from babai_ao.calibration.sequential import layer_hessians, quantize_model

pytestmark = pytest.mark.usefixtures("exact_cpu_kernel")  # exact references

GROUP = 32


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gpt2", n_layer=2, n_embd=64, n_head=4, vocab_size=128,
                               n_positions=64, bos_token_id=0, eos_token_id=0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def bert() -> nn.Module:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64)
    return BertForMaskedLM(cfg).eval()


def ids() -> torch.Tensor:
    return torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))


def padded() -> dict[str, torch.Tensor]:
    mask = torch.ones(4, 32, dtype=torch.long)
    mask[1, 20:] = 0
    mask[3, 7:] = 0
    return {"input_ids": ids(), "attention_mask": mask}


def block_layers(model: nn.Module) -> dict[str, nn.Module]:
    path, blocks = find_blocks(model)
    return {f"{path}.{i}.{n}": m for i, b in enumerate(blocks)
            for n, m in b.named_modules() if is_quantizable(m)}


def reference_hessians(model: nn.Module, calibration: dict | torch.Tensor, batch: int
                       ) -> dict[str, torch.Tensor]:
    """Independent ``XᵀX`` of every block layer's input over the non-padded tokens only."""
    calib = calibration if isinstance(calibration, dict) else {"input_ids": calibration}
    layers = block_layers(model)
    accs = {n: HessianAccumulator(weight_matrix(m).shape[1]) for n, m in layers.items()}
    keep: list[torch.Tensor] = []
    handles = [m.register_forward_pre_hook(lambda _m, a, n=n: accs[n].add(a[0][keep[0]]))
               for n, m in layers.items()]
    try:
        with torch.no_grad():
            for i in range(0, len(calib["input_ids"]), batch):
                part = {k: v[i:i + batch] for k, v in calib.items()}
                keep[:] = [part.get("attention_mask", torch.ones_like(part["input_ids"])).bool()]
                model(**part)
    finally:
        for h in handles:
            h.remove()
    return {n: a.hessian for n, a in accs.items()}


def assert_output_equals_dequantized(float_model, quantized, **inputs):
    with torch.no_grad():
        got = quantized(**inputs).logits
        want = dequantized_model(quantized, float_model)(**inputs).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---- GPT-2: Conv1D ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt2_quantized():
    flt, model = gpt2(), gpt2()
    report = quantize_model(model, babai_config(bits=4, group_size=GROUP), ids(), batch_size=2,
                            progress=False)
    return flt, model, report


def test_gpt2_every_conv1d_quantized_in_place(gpt2_quantized):
    flt, model, report = gpt2_quantized
    layers = block_layers(model)
    assert {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in layers} == {
        "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    assert [r.name for r in report.rows] == list(layers)
    for name, m in layers.items():
        assert type(m) is Conv1D, name  # the module stays a Conv1D
        w = m.weight.detach()
        assert isinstance(w, BabaiQuantizedTensor) and w.transposed, name
        assert tuple(w.shape) == tuple(flt.get_submodule(name).weight.shape)  # [in, out]
    assert list(model.state_dict()) == list(flt.state_dict())  # checkpoint keys unchanged
    for r in report.rows:
        assert r.tokens == ids().numel()
        assert all(math.isfinite(v) and v >= 0 for v in (r.trace_d, r.error, r.bound))


def test_gpt2_output_equals_dequantized_weights(gpt2_quantized):
    flt, model, _ = gpt2_quantized
    assert_output_equals_dequantized(flt, model, input_ids=ids())


def test_gpt2_observe_quantizes_the_transpose_against_the_input_hessian():
    """Observe mode: each Conv1D holds quantize_weight(Wᵀ stored → W [out, in], H of its
    input) — the Hessian is the input's, as for nn.Linear."""
    flt, model = gpt2(), gpt2()
    config = babai_config(bits=4, group_size=GROUP)
    quantize_model(model, config, ids(), mode="observe", batch_size=2, progress=False)
    hessians = reference_hessians(flt, ids(), 2)
    for name, m in block_layers(model).items():
        ref = quantize_weight(flt.get_submodule(name).weight.detach().t(), hessians[name],
                              bits=4, group_size=GROUP, order="act")
        got = m.weight.detach().dequantize().t()
        assert (got != ref.dequantize()).float().mean() < 1e-3, name


def test_gpt2_layer_hessians_are_conv1d_inputs():
    model = gpt2()
    accs = layer_hessians(model, ids(), batch_size=2)
    ref = reference_hessians(model, ids(), 2)
    assert list(accs) == list(ref)
    for name, acc in accs.items():
        torch.testing.assert_close(acc.hessian, ref[name], rtol=1e-5, atol=1e-4)


def test_gpt2_unclipped_bound_holds():
    flt, model = gpt2(), gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # out-of-range codes: dequantized floats installed
        report = quantize_model(model, babai_config(bits=3, group_size=GROUP, clip=False),
                                ids(), batch_size=2, progress=False)
    assert len(report.rows) == 8
    assert report.bound_checks() == (8, 8)
    for name, m in block_layers(model).items():  # dequantized values, written in place
        assert not torch.equal(m.weight, flt.get_submodule(name).weight), name


def test_gpt2_ssqr(gpt2_quantized):
    flt, model = gpt2(), gpt2()
    report = quantize_model(model, babai_config(bits=4, group_size=GROUP, clip="ssqr"), ids(),
                            batch_size=2, progress=False)
    assert report.bound_checks() == (8, 8)
    assert all(m.weight.detach().transposed for m in block_layers(model).values())
    assert_output_equals_dequantized(flt, model, input_ids=ids())


def test_gpt2_hptq_refused_before_any_work():
    model = gpt2()
    with pytest.raises(BabaiError, match="hptq.*Conv1D"):
        quantize_model(model, babai_config(clip="hptq", target_bits=3.3), ids(), progress=False)
    assert all(type(m.weight.detach()) is torch.Tensor for m in block_layers(model).values())


def test_gpt2_save_load_round_trip(gpt2_quantized, tmp_path):
    from babai_ao.checkpoints import hf

    flt, model, _ = gpt2_quantized
    model.save_pretrained(tmp_path)
    loaded = hf.from_pretrained(tmp_path).eval()
    for name, m in block_layers(loaded).items():
        w, orig = m.weight.detach(), model.get_submodule(name).weight.detach()
        assert isinstance(w, BabaiQuantizedTensor) and w.transposed, name
        assert torch.equal(w.qdata, orig.qdata), name
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids()).logits, model(ids()).logits)


# ---- BERT: encoder, padded calibration ----------------------------------------------------

def test_bert_blocks_found():
    assert find_blocks(bert())[0] == "bert.encoder.layer"


def test_bert_all_linears_quantized_output_equals_dequantized():
    flt, model = bert(), bert()
    calib = padded()
    report = quantize_model(model, babai_config(bits=4, group_size=GROUP), calib, batch_size=2,
                            progress=False)
    layers = block_layers(model)
    assert len(layers) == 12 and [r.name for r in report.rows] == list(layers)
    assert all(isinstance(m.weight.detach(), BabaiQuantizedTensor) for m in layers.values())
    tokens = int(calib["attention_mask"].sum())
    assert all(r.tokens == tokens for r in report.rows)
    assert_output_equals_dequantized(flt, model, **calib)


def test_bert_hessians_leave_padding_out():
    """H = XᵀX of exactly the non-padded tokens' inputs (hooks on the float model), both from
    layer_hessians and as quantize_model's observe mode uses them."""
    model, calib = bert(), padded()
    ref = reference_hessians(model, calib, 2)
    accs = layer_hessians(model, calib, batch_size=2)
    for name, acc in accs.items():
        torch.testing.assert_close(acc.hessian, ref[name], rtol=1e-5, atol=1e-4)
        assert acc.tokens == int(calib["attention_mask"].sum())
    unmasked = layer_hessians(model, calib["input_ids"], batch_size=2)
    name = next(iter(accs))
    assert not torch.allclose(unmasked[name].hessian, accs[name].hessian)

    quantized = bert()
    quantize_model(quantized, babai_config(bits=4, group_size=GROUP), calib, mode="observe",
                   batch_size=2, progress=False)
    for name, m in block_layers(quantized).items():
        want = quantize_weight(model.get_submodule(name).weight.detach(), ref[name], bits=4,
                               group_size=GROUP, order="act").dequantize()
        assert (m.weight.detach().dequantize() != want).float().mean() < 1e-3, name


# ---- generic discovery ----------------------------------------------------------------

class Expert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(x)


class Block(nn.Module):
    def __init__(self, experts: int = 0) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.experts = nn.ModuleList(Expert() for _ in range(experts))

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        x = x + scale * torch.relu(self.proj(x))
        return x + sum((e(x) for e in self.experts), torch.zeros_like(x))


class Toy(nn.Module):
    """No known attribute path: ``stack`` (3 blocks, each with 5 'experts') and ``head``."""

    def __init__(self, blocks: int = 3, experts: int = 5, other: int = 0) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.stack = nn.ModuleList(Block(experts) for _ in range(blocks))
        self.other = nn.ModuleList(Block() for _ in range(other))
        self.head = nn.Linear(16, 32)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for b in self.stack:
            x = b(x, scale=0.5)
        return self.head(x)


def test_generic_discovery_outermost_longest_list():
    path, blocks = find_blocks(Toy())
    assert path == "stack" and len(blocks) == 3  # not the 5-long expert lists inside
    assert find_blocks(Toy(), "stack")[0] == "stack"


def test_generic_model_quantized():
    torch.manual_seed(0)
    flt = Toy(experts=2)
    model = copy.deepcopy(flt)
    calib = torch.randint(0, 32, (4, 8))
    report = quantize_model(model, babai_config(bits=4, group_size=16), calib, batch_size=2,
                            progress=False)
    assert len(report.rows) == 3 * 3
    kinds = {p.name: p.kind for p in report.float_parameters}
    assert kinds["head.weight"] == "outside blocks" and kinds["embed.weight"] == "embedding"
    with torch.no_grad():
        torch.testing.assert_close(model(calib), dequantized_model(model, flt)(calib))


def test_discovery_errors_name_what_was_found():
    with pytest.raises(BabaiError, match=r"several equally long.*stack \(3 × Block\).*"
                                         r"other \(3 × Block\).*blocks="):
        find_blocks(Toy(other=3))
    with pytest.raises(BabaiError, match=r"no block list.*no nn.ModuleList at all.*blocks="):
        find_blocks(nn.Sequential(nn.Linear(4, 4)))
    norms = nn.Module()
    norms.layers = nn.ModuleList([nn.LayerNorm(4), nn.LayerNorm(4)])
    with pytest.raises(BabaiError, match=r"layers \(2 × LayerNorm\): no nn.Linear or Conv1D"):
        find_blocks(norms)
    with pytest.raises(BabaiError, match="no such submodule"):
        find_blocks(Toy(), "encoder.layer")
    with pytest.raises(BabaiError, match="blocks='head' is a Linear"):
        find_blocks(Toy(), "head")
    with pytest.raises(BabaiError, match="several") as err:
        quantize_model(Toy(other=3), babai_config(), torch.zeros(1, 4, dtype=torch.long))
    assert "\n" not in str(err.value)


# ---- what stayed float ------------------------------------------------------------------

def test_float_report_shares_sum_and_unselected_listed():
    flt, model = gpt2(), gpt2()
    report = quantize_model(model, babai_config(bits=4, group_size=GROUP), ids(), batch_size=2,
                            progress=False, filter_fn=lambda _m, name: "c_fc" not in name)
    total = sum(p.numel() for p in flt.parameters())  # distinct tensors (tied counted once)
    assert report.total_parameters == total
    quantized = sum(flt.get_submodule(r.name).weight.numel() for r in report.rows)
    assert report.quantized_parameters == quantized
    assert report.quantized_share == pytest.approx(quantized / total)
    assert sum(report.float_by_kind().values()) + quantized == total
    kinds = {p.name: p.kind for p in report.float_parameters}
    for i in range(2):
        assert kinds[f"transformer.h.{i}.mlp.c_fc.weight"] == "not selected"
        assert type(model.transformer.h[i].mlp.c_fc.weight.detach()) is torch.Tensor
        assert kinds[f"transformer.h.{i}.ln_1.weight"] == "norm"
    wte = next(p for p in report.float_parameters if p.name == "transformer.wte.weight")
    assert wte.kind == "embedding" and wte.tied == ("lm_head.weight",)
    assert len(report.rows) == 6
    md = report.to_markdown()
    assert "transformer.h.*.mlp.c_fc.weight | not selected | 2 |" in md
    assert f"{report.quantized_share:.1%} of {total:,} parameters quantized" in md


def test_float_report_bert_lists_embeddings_and_head():
    model = bert()
    report = quantize_model(model, babai_config(bits=4, group_size=GROUP), padded(),
                            batch_size=2, progress=False)
    kinds = report.float_by_kind()
    assert kinds["embedding"] > 0 and kinds["norm"] > 0 and kinds["outside blocks"] > 0
    names = {p.name: p for p in report.float_parameters}
    assert names["cls.predictions.transform.dense.weight"].kind == "outside blocks"
    words = names["bert.embeddings.word_embeddings.weight"]
    assert words.kind == "embedding" and words.tied == ("cls.predictions.decoder.weight",)
    assert 0 < report.quantized_share < 1
