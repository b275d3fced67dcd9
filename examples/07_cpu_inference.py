"""Fast CPU inference: a 4-bit model on torch's int4pack kernel, by default, vs float.

    python examples/07_cpu_inference.py [--small] [--tokens 32]

On CPU, a quantized 4-bit layer (groups 32–256, out_features % 16 == 0) runs torch's
``aten._weight_int4pack_mm_for_cpu`` with no extra call — on an fp32 model too: the
activations are rounded to bf16 for the kernel and the result cast back (the kernel's
layout is built once per layer, on the first call or when ``torch.compile`` first sees the
weight, and kept on it; never saved). ``with babai_ao.cpu_kernel("exact"):`` runs the exact
fp32 path instead (bit-exact vs ``F.linear`` with the dequantized weight, much slower).
Prints greedy-decoding tokens/s of the compiled float and 4-bit models (static KV cache),
measured side by side in this process.
"""

import argparse
import copy
import time

import torch
from babai_ao.export.llm import static_cache_module
from torchao.quantization import quantize_

from babai_ao import babai_config, load_smollm2

p = argparse.ArgumentParser()
p.add_argument("--small", action="store_true", help="2 blocks, 8 tokens (CI)")
p.add_argument("--tokens", type=int, default=32)
args = p.parse_args()
tokens = 8 if args.small else args.tokens

model, tokenizer = load_smollm2(num_layers=2 if args.small else None)  # fp32
quantized = copy.deepcopy(model)
# RTN for brevity (see 02_sequential_calibration.py for Babai with calibration)
quantize_(quantized, babai_config(bits=4, group_size=64),
          filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "layers" in fqn)
print(quantized.model.layers[0].self_attn.q_proj.weight)


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

    run()  # compile (and build the int4pack layouts)
    t0 = time.perf_counter()
    out = run()
    return out, tokens / (time.perf_counter() - t0)


for name, m in (("fp32", model), ("4-bit (fp32 model)", quantized)):
    out, speed = decode(m)
    print(f"{name:>20}: {speed:6.1f} tokens/s  {tokenizer.decode(out)!r}")
