"""Fused MoE experts (Qwen3-MoE, Mixtral): per-expert Hessians of exactly the routed tokens,
every expert weight quantized into packed codes, outputs equal to the dequantized model,
eager and ``torch.compile(fullgraph=True)``, unrouted experts named, save/load round trip."""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import pytest
import torch

import babai_ao
from babai_ao import BabaiError
from babai_ao.ao.experts import BabaiExperts
from babai_ao.ao.reference import dequantized_model
from babai_ao.calibration import experts as moe
from babai_ao.calibration.blocks import calibration_batches, decoder_blocks, first_block_inputs

pytestmark = pytest.mark.usefixtures("exact_cpu_kernel")  # exact references


FAMILIES = {
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      decoder_sparse_step=1, mlp_only_layers=[]),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32),
}


def tiny(family: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(family, vocab_size=128, hidden_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               **FAMILIES[family])
    return AutoModelForCausalLM.from_config(cfg).eval()


IDS = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
CONFIG = babai_ao.babai_config(bits=4, group_size=32)


@pytest.fixture(scope="module", params=list(FAMILIES))
def quantized(request):
    family = request.param
    model = tiny(family)
    float_model = copy.deepcopy(model)
    report = babai_ao.quantize_model(model, CONFIG, IDS, progress=False)
    return family, model, float_model, report


def test_every_expert_weight_is_quantized(quantized) -> None:
    family, model, _, report = quantized
    for layer in model.model.layers:
        assert isinstance(layer.mlp.experts, BabaiExperts), family
        assert not any(p.dim() == 3 for p in layer.mlp.experts.parameters())
        assert layer.mlp.gate.weight.dtype == torch.float32  # the router stays float
    names = [r.name for r in report.rows if ".experts." in r.name]
    assert len(names) == 2 * 2 * 4  # layers × (gate_up, down) × experts
    routed = [r.tokens for r in report.rows if ".experts.gate_up_proj[" in r.name]
    assert sum(routed[:4]) == IDS.numel() * 2  # top-2: every token reaches two experts
    assert all(r.bound > 0 and r.error >= 0 for r in report.rows)
    # nothing silent: the routers are listed float, the experts count as quantized
    kinds = {f.name: f.kind for f in report.float_parameters}
    assert kinds["model.layers.0.mlp.gate.weight"] == "router"
    assert not any(".experts." in name for name in kinds)
    experts = 2 * 4 * 3 * 32 * 64  # layers × experts × (2I·H + H·I)
    assert report.quantized_parameters >= experts
    assert report.quantized_parameters + sum(f.numel for f in report.float_parameters) == \
        report.total_parameters
    from babai_ao.cli.runs import stored_bits_per_weight

    # 4-bit codes + fp16 scale and 4-bit zero per 32 weights, linears and experts alike
    assert stored_bits_per_weight(model) == pytest.approx(4 + 16 / 32 + 4 / 32, abs=0.01)
    ex = model.model.layers[0].mlp.experts
    assert 8 * ex.nbytes_stored == pytest.approx(ex.quantized_numel() * (4 + 16 / 32 + 4 / 32))


def test_outputs_equal_the_dequantized_model_eager_and_compiled(quantized) -> None:
    family, model, float_model, _ = quantized
    ref = dequantized_model(model, float_model)
    with torch.no_grad():
        got, want = model(IDS).logits, ref(IDS).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        compiled = torch.compile(model, fullgraph=True)  # no graph break anywhere
        torch.testing.assert_close(compiled(IDS).logits, got, rtol=1e-5, atol=1e-5)


def test_expert_hessian_is_xtx_of_exactly_its_routed_tokens() -> None:
    """Independent check: record the router's choice and the experts' input on the float
    model with a plain hook, and build each expert's XᵀX from those rows alone."""
    model = tiny("qwen3_moe")
    path, blocks = decoder_blocks(model)
    block = blocks[0]
    inputs = first_block_inputs(model, block, calibration_batches(IDS, 4))
    seen = []
    handle = block.mlp.experts.register_forward_pre_hook(
        lambda m, args: seen.append((args[0].detach().clone(), args[1].clone())))
    with torch.no_grad():
        for inp in inputs:
            moe.run_block(block, inp)
    handle.remove()
    accs = moe.collect(block, block.mlp.experts, "gate_up", inputs)
    for e in range(4):
        rows = [x[(idx == e).any(dim=-1)] for x, idx in seen]
        x = torch.cat(rows)
        assert accs[e].tokens == x.shape[0] > 0
        torch.testing.assert_close(accs[e].hessian, x.T @ x, rtol=1e-5, atol=1e-4)
        others = torch.cat([x[~(idx == e).any(dim=-1)] for x, idx in seen])
        assert not torch.allclose(accs[e].hessian, torch.cat([x, others]).T @ torch.cat(
            [x, others]))  # tokens routed elsewhere are left out


def test_padded_tokens_stay_out_of_the_expert_hessians() -> None:
    """With a padded calibration batch, every expert Hessian counts only the tokens the
    attention mask keeps: over the experts, top_k × the unpadded tokens (the router still
    routes the padded positions, so counting them would give top_k × all positions)."""
    model = tiny("qwen3_moe")
    mask = torch.ones_like(IDS)
    mask[1, 20:] = 0
    mask[3, 9:] = 0
    report = babai_ao.quantize_model(model, CONFIG, {"input_ids": IDS, "attention_mask": mask},
                                     progress=False)
    for layer in range(2):
        for part in ("gate_up", "down"):
            tokens = sum(r.tokens for r in report.rows
                         if r.name.startswith(f"model.layers.{layer}.mlp.experts.{part}_proj["))
            assert tokens == 2 * int(mask.sum())
    dense = [r for r in report.rows if r.name.endswith("self_attn.q_proj")]
    assert {r.tokens for r in dense} == {int(mask.sum())}  # the same rule as dense linears


def test_an_expert_no_token_reached_is_named_and_rounded() -> None:
    model = tiny("qwen3_moe")

    def never_three(_m, _args, out):  # the router never picks expert 3
        logits, weights, index = out
        return logits, weights, torch.where(index == 3, torch.zeros_like(index), index)

    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(never_three)
    strict = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"experts \[3\] received no calibration tokens"):
        report = babai_ao.quantize_model(model, CONFIG, IDS, progress=False)
    rows = {r.name: r for r in report.rows}
    assert rows["model.layers.0.mlp.experts.gate_up_proj[3]"].tokens == 0
    assert rows["model.layers.0.mlp.experts.gate_up_proj[0]"].tokens > 0
    with pytest.raises(BabaiError, match="pass more calibration data"):
        moe.quantize_experts(decoder_blocks(strict)[1][0], "model.layers.0",
                             first_block_inputs(strict, decoder_blocks(strict)[1][0],
                                                calibration_batches(IDS, 4)),
                             dict(bits=4, group_size=32, clip=True), strict=True)


def test_state_dict_round_trip(quantized, tmp_path: Path) -> None:
    family, model, float_model, _ = quantized
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    fresh = copy.deepcopy(float_model)
    for layer, src in zip(fresh.model.layers, model.model.layers, strict=True):
        e = src.mlp.experts
        layer.mlp.experts = BabaiExperts(e.num_experts, e.hidden_dim, e.intermediate_dim,
                                         e.bits, e.group_size, e.act)
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True), assign=True)
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, model(IDS).logits)


def test_unsupported_layouts_and_formats_say_so() -> None:
    model = tiny("qwen3_moe")
    block = decoder_blocks(model)[1][0]
    block.mlp.experts.is_transposed = True
    with pytest.raises(BabaiError, match="transposed"):
        moe.fused_experts(block)
    block.mlp.experts.is_transposed = False
    with warnings.catch_warnings(), pytest.raises(BabaiError, match="clip=True"):
        warnings.simplefilter("ignore")
        babai_ao.quantize_model(model, babai_ao.babai_config(clip="hptq", target_bits=3.3), IDS,
                                progress=False)


LOAD = """
import sys, torch, babai_ao
from transformers import AutoModelForCausalLM
path = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(path)
expected = torch.load(path + "/expected.pt")
with torch.no_grad():
    logits = model(expected["ids"]).logits
assert type(model.model.layers[0].mlp.experts).__name__ == "BabaiExperts"
assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().max()
"""


def test_save_pretrained_from_pretrained_fresh_process(quantized, tmp_path: Path) -> None:
    """Plain transformers calls: config.json's ``babai_experts`` rebuilds the packed experts
    before the weights load, in a process that never quantized anything."""
    import subprocess
    import sys

    family, model, _, _ = quantized
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        torch.save({"ids": IDS, "logits": model(IDS).logits}, tmp_path / "expected.pt")
    env = {**os.environ, "BABAI_CPU_KERNEL": "exact"}  # expected.pt holds exact logits
    run = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path)], capture_output=True,
                         text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
