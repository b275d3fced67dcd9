"""Save a quantized model as safetensors and load it back, bit-exact.

    python examples/06_load_checkpoint.py [--small] [--out DIR]

The same directory layout as ``babai-ao quantize --out DIR`` (which also writes the run
record ``babai_run.json``), so ``babai-ao eval DIR`` works on it too.
"""

import argparse
import tempfile

import torch
from torchao.quantization import quantize_

from babai_ao import babai_config, load_smollm2
from babai_ao.checkpoints.hf import from_pretrained, save_pretrained

p = argparse.ArgumentParser()
p.add_argument("--small", action="store_true", help="1 block (CI)")
p.add_argument("--out", default=None, help="checkpoint directory")
args = p.parse_args()

model, tokenizer = load_smollm2(num_layers=1 if args.small else None)
config = babai_config(bits=4, group_size=64)
quantize_(model, config,
          filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "layers" in fqn)

out = args.out or tempfile.mkdtemp()
save_pretrained(model, out, config)   # safetensors; config.json carries it
tokenizer.save_pretrained(out)
loaded = from_pretrained(out)          # any fresh process: no other setup

ids = tokenizer("A checkpoint round trip", return_tensors="pt").input_ids
with torch.no_grad():
    a = model(input_ids=ids).logits
    b = loaded(input_ids=ids).logits
w = loaded.model.layers[0].self_attn.q_proj.weight
print(f"loaded {type(w).__name__}: bits={w.bits}, group_size={w.group_size}, "
      f"certificate: E {w.certificate.error:.4g}, B {w.certificate.bound:.4g}, "
      f"clipped {w.certificate.clipped}")
print(f"max |logits diff| after reload: {(a - b).abs().max().item()}")
assert torch.equal(a, b)
