"""Export a quantized causal LM to ExecuTorch (.pte) and decode with the runtime.

    python examples/04_export_executorch.py [--small] [--out model.pte]

The static KV cache lives inside the program; ``greedy_executorch`` feeds one token per
call. The packed 4-bit weights stay packed in the .pte (mode="weight_only").
"""

import argparse
import tempfile
from pathlib import Path

import torch
from babai_ao.export import export_llm_executorch, greedy_eager, greedy_executorch
from torchao.quantization import quantize_

from babai_ao import babai_config, load_smollm2

p = argparse.ArgumentParser()
p.add_argument("--small", action="store_true", help="1 block (CI)")
p.add_argument("--out", default=None, help="where to write the .pte")
args = p.parse_args()

model, tokenizer = load_smollm2(num_layers=1 if args.small else None)
quantize_(model, babai_config(bits=4, group_size=64),
          filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "layers" in fqn)

path = Path(args.out or Path(tempfile.mkdtemp()) / "smollm2-w4.pte")
export_llm_executorch(model, path, max_cache_len=32, mode="weight_only")
prompt = tokenizer("The capital of France is").input_ids
got = greedy_executorch(path, prompt, 6, max_cache_len=32)
ref = greedy_eager(model, prompt, 6, max_cache_len=32)
print(f"{path} ({path.stat().st_size / 2**20:.1f} MiB): {tokenizer.decode(got)!r}")
print(f"ExecuTorch tokens == eager tokens: {got == ref}")
assert got == ref
