"""torch.compile with quantized weights: the same logits as eager, and greedy decoding.

    python examples/03_compile_inference.py [--small]

Every linear with a BabaiQuantizedTensor weight runs the custom op ``babai::linear``
(packed codes are dequantized inside the op; no float weight is materialized).
"""

import argparse

import torch
from torchao.quantization import quantize_

from babai_ao import babai_config, load_smollm2

p = argparse.ArgumentParser()
p.add_argument("--small", action="store_true", help="1 block (CI)")
args = p.parse_args()

model, tokenizer = load_smollm2(num_layers=1 if args.small else None)
# RTN for brevity (see 02_sequential_calibration.py for Babai with calibration)
quantize_(model, babai_config(bits=4, group_size=64),
          filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "layers" in fqn)

ids = tokenizer("Lattices and rounding:", return_tensors="pt").input_ids
compiled = torch.compile(model, fullgraph=True)
with torch.no_grad():
    eager = model(input_ids=ids, use_cache=False).logits
    fast = compiled(input_ids=ids, use_cache=False).logits
print(f"compiled vs eager: max |diff| {(fast - eager).abs().max().item():.3e}")
assert torch.allclose(fast, eager, atol=1e-3, rtol=1e-3)

# greedy decoding through the same compiled module (a static cache avoids recompiles)
out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                     do_sample=False, cache_implementation="static",
                     pad_token_id=tokenizer.eos_token_id)
print(repr(tokenizer.decode(out[0, ids.shape[1]:])))
