"""Export a quantized causal LM to ONNX and decode with onnxruntime.

    python examples/05_export_onnx.py [--small] [--out model.onnx]

4-bit layers become DequantizeLinear(UINT4) + MatMul, which onnxruntime fuses into
MatMulNBits; the KV cache is passed in and out explicitly (ONNX has no state).
"""

import argparse
import tempfile
from pathlib import Path

import torch
from babai_ao.export import export_llm_onnx, greedy_eager, greedy_onnx
from torchao.quantization import quantize_

from babai_ao import babai_config, load_smollm2

p = argparse.ArgumentParser()
p.add_argument("--small", action="store_true", help="1 block (CI)")
p.add_argument("--out", default=None, help="where to write the .onnx")
args = p.parse_args()

model, tokenizer = load_smollm2(num_layers=1 if args.small else None)
quantize_(model, babai_config(bits=4, group_size=64),
          filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "layers" in fqn)

path = Path(args.out or Path(tempfile.mkdtemp()) / "smollm2-w4.onnx")
export_llm_onnx(model, path, max_cache_len=32, format="qdq")
prompt = tokenizer("The capital of France is").input_ids
got = greedy_onnx(path, prompt, 6, max_cache_len=32)
ref = greedy_eager(model, prompt, 6, max_cache_len=32)
print(f"{path} ({path.stat().st_size / 2**20:.1f} MiB): {tokenizer.decode(got)!r}")
print(f"onnxruntime tokens == eager tokens: {got == ref}")
assert got == ref
