"""Save a quantized model as safetensors and load it back, bit-exact.

    python examples/06_load_checkpoint.py [--small] [--out DIR]

The same directory layout as ``babai-ao quantize --out DIR`` (which also writes the run
record ``babai_run.json``), so ``babai-ao eval DIR`` works on it too.
"""

import argparse
import tempfile

import torch
from torchao.quantization import quantize_

from babai_ao import babai_config, load_quantized, load_smollm2, save_quantized

p = argparse.ArgumentParser()
p.add_argument("--small", action="store_true", help="1 block (CI)")
p.add_argument("--out", default=None, help="checkpoint directory")
args = p.parse_args()

model, tokenizer = load_smollm2(num_layers=1 if args.small else None)
quantize_(model, babai_config(bits=4, group_size=64),
          filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "layers" in fqn)

out = args.out or tempfile.mkdtemp()
save_quantized(model, out)
tokenizer.save_pretrained(out)
loaded = load_quantized(out)

ids = tokenizer("A checkpoint round trip", return_tensors="pt").input_ids
with torch.no_grad():
    a = model(input_ids=ids).logits
    b = loaded(input_ids=ids).logits
w = loaded.model.layers[0].self_attn.q_proj.weight
print(f"loaded {type(w).__name__}: bits={w.bits}, group_size={w.group_size}, "
      f"certificate error {w.certificate.error:.4g} <= bound {w.certificate.bound:.4g}")
print(f"max |logits diff| after reload: {(a - b).abs().max().item()}")
assert torch.equal(a, b)
