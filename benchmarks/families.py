"""Which model families ``quantize_model`` handles: tiny random-weight models of each family.

For every family (built from a transformers config, nothing downloaded): sequential
calibration on random token ids (4 × 32), then

* share of the blocks' weights quantized (linears, GPT-2 ``Conv1D``, fused MoE experts)
  and of all parameters (embeddings, norms, routers stay float),
* max |logits − logits of the float model holding the dequantized weights| (eager),
* graph breaks of ``torch._dynamo.explain`` on the quantized model,
* seconds of ``quantize_model``.

    python benchmarks/families.py [--out benchmarks/results/families.json]

Prints a Markdown table (BENCHMARKS.md "Model families").
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import babai_ao
from babai_ao.ao.reference import dequantized_model

SMALL = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, intermediate_size=128,
             max_position_embeddings=128)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("causal", {}),
    "qwen2": ("causal", {}),
    "qwen3": ("causal", {}),
    "mistral": ("causal", {}),
    "gemma2": ("causal", {}),
    "gpt_neox": ("causal", dict(rotary_pct=1.0)),
    "opt": ("causal", dict(ffn_dim=128, word_embed_proj_dim=64)),
    "qwen3_moe": ("causal", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                 decoder_sparse_step=1, mlp_only_layers=[])),
    "mixtral": ("causal", dict(num_local_experts=4, num_experts_per_tok=2)),
    "gpt2": ("causal", dict(n_layer=2, n_embd=64, n_head=4, n_positions=128)),
    "bert": ("masked", dict(max_position_embeddings=128)),
}


def build(family: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    kind, extra = FAMILIES[family]
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(family, **{**SMALL, **extra})
    auto = AutoModelForCausalLM if kind == "causal" else AutoModelForMaskedLM
    return auto.from_config(cfg).eval()


def measure(family: str) -> dict[str, Any]:
    model = build(family)
    float_model = copy.deepcopy(model)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = babai_ao.quantize_model(model, babai_ao.babai_config(bits=4, group_size=32),
                                         ids, progress=False)
    seconds = time.perf_counter() - t0
    ref = dequantized_model(model, float_model)
    with torch.no_grad():
        diff = float((model(ids).logits - ref(ids).logits).abs().max())
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(ids)
    in_blocks = sum(f.numel for f in report.float_parameters if f.kind in ("not selected",))
    return {"family": family, "layers": len(report.rows), "seconds": round(seconds, 2),
            "quantized_share": round(report.quantized_share, 4),
            "block_float_left": in_blocks, "max_abs_diff": diff,
            "graph_breaks": explained.graph_break_count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/families.json")
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [measure(f) for f in args.families]
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print("| family | quantized layers (rows) | share of all parameters quantized | block "
          "weights left float | max abs diff vs dequantized | graph breaks | seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['layers']} | {r['quantized_share']:.1%} | "
              f"{r['block_float_left']} | {r['max_abs_diff']:.1e} | {r['graph_breaks']} | "
              f"{r['seconds']} |")


if __name__ == "__main__":
    main()
