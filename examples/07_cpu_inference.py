"""Fast CPU inference: a 4-bit model in bf16 on torch's int4pack kernel, vs float.

    python examples/07_cpu_inference.py [--small] [--tokens 32]

``babai_ao.prepare_cpu(model)`` (after loading, before ``torch.compile``) swaps every 4-bit
layer for a module whose forward is ``aten._weight_int4pack_mm_for_cpu`` on a layout built
once (HPTQ layers: ``aten._weight_int8pack_mm``). It computes in bf16; save the model
before preparing it, not after. Prints greedy-decoding tokens/s of the compiled float and
4-bit models (static KV cache), measured side by side in this process.
"""

import argparse
import copy
import time

import torch
from babai_ao.export.llm import static_cache_module
from torchao.quantization import quantize_

from babai_ao import babai_config, load_smollm2, prepare_cpu

p = argparse.ArgumentParser()
p.add_argument("--small", action="store_true", help="2 blocks, 8 tokens (CI)")
p.add_argument("--tokens", type=int, default=32)
args = p.parse_args()
tokens = 8 if args.small else args.tokens

model, tokenizer = load_smollm2(num_layers=2 if args.small else None)
model = model.to(torch.bfloat16)
quantized = copy.deepcopy(model)
# RTN for brevity (see 02_sequential_calibration.py for Babai with calibration)
quantize_(quantized, babai_config(bits=4, group_size=64),
          filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "layers" in fqn)
print("prepared:", prepare_cpu(quantized))
print(quantized.model.layers[0].self_attn.q_proj)


def decode(m: torch.nn.Module) -> tuple[list[int], float]:
    """Greedy tokens from BOS through a compiled static-cache step, and tokens/s."""
    step = torch.compile(static_cache_module(m, tokens))

    def run() -> list[int]:
        out, tok = [], tokenizer.bos_token_id or 1
        for pos in range(tokens):
            with torch.no_grad():
                logits = step(input_ids=torch.tensor([[tok]]),
                              cache_position=torch.tensor([pos]))
            tok = int(logits[0, -1].argmax())
            out.append(tok)
        return out

    run()  # compile
    t0 = time.perf_counter()
    out = run()
    return out, tokens / (time.perf_counter() - t0)


for name, m in (("bf16", model), ("4-bit, prepare_cpu", quantized)):
    out, speed = decode(m)
    print(f"{name:>20}: {speed:6.1f} tokens/s  {tokenizer.decode(out)!r}")
