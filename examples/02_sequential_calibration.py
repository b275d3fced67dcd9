"""Sequential (block-by-block) calibration of a transformers model with quantize_model.

    python examples/02_sequential_calibration.py [--small]

Each decoder block is calibrated on the outputs of the already-quantized blocks before it
(GPTQ practice); the report lists every linear's certificate: tr(D), error E, bound B.
"""

import argparse

import torch

from babai_ao import babai_config, calibration_windows, load_smollm2, perplexity, quantize_model
from babai_ao.calibration.data import test_tokens

p = argparse.ArgumentParser()
p.add_argument("--small", action="store_true", help="1 block, tiny calibration (CI)")
args = p.parse_args()
layers, n, seq, windows, eval_len = (1, 4, 64, 2, 128) if args.small else (None, 32, 512, 4, 2048)

model, tokenizer = load_smollm2(num_layers=layers)
calib = calibration_windows(tokenizer, n=n, seq_len=seq)          # [n, seq] token ids
ids = test_tokens(tokenizer)
ppl_float = perplexity(model, ids, windows=windows, seq_len=eval_len)

config = babai_config(bits=4, group_size=64, order="act")
report = quantize_model(model, config, calib, mode="sequential")
print(report.to_markdown())
held, applicable = report.bound_checks()
print(f"E <= B on {held}/{applicable} unclipped layers; {report.seconds:.1f} s")
ppl = perplexity(model, ids, windows=windows, seq_len=eval_len)
print(f"perplexity ({windows} x {eval_len} tokens): float {ppl_float:.3f}, babai {ppl:.3f}")
assert torch.isfinite(torch.tensor(ppl))
