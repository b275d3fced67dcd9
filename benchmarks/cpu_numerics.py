"""Numerics of the CPU kernels on a calibrated model: the default (int4pack, bf16
activations) vs the exact path (fp32 dequantize + fp32 matmul), P1 perplexity and logits.

SmolLM2-135M, every decoder linear quantized by ``quantize_model`` (P1 calibration:
128 × 512 tokens, w4g64, order act, sequential), fp32 model. The same quantized model is
evaluated twice — under ``babai_ao.cpu_kernel("exact")`` and under the default — on the P1
windows (40 × 2048 tokens of wiki.test.raw), and the logits of the first ``--logit-windows``
windows are compared (max |Δ logit|, argmax agreement).

    python benchmarks/cpu_numerics.py --save /tmp/w4g64.pt        # quantize (≈15 min), save
    python benchmarks/cpu_numerics.py --load /tmp/w4g64.pt --out benchmarks/results/cpu_numerics.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import torch

from babai_ao import babai_config, cpu_kernel, quantize_model
from babai_ao.calibration.data import calibration_windows, test_tokens
from babai_ao.calibration.evaluate import window_losses
from babai_ao.calibration.models import load_smollm2


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--save", help="quantize and torch.save the state dict here")
    p.add_argument("--load", help="load a state dict saved by --save")
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--logit-windows", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--out")
    args = p.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = load_smollm2()
    config = babai_config(bits=4, group_size=64, order="act")
    if args.save:
        cal = calibration_windows(tokenizer, n=128, seq_len=512)
        quantize_model(model, config, cal, mode="sequential", batch_size=8)
        torch.save(model.state_dict(), args.save)
        print(f"saved -> {args.save}")
        return
    quantize_model(model, config, calibration_windows(tokenizer, n=1, seq_len=16),
                   mode="sequential", batch_size=1)  # the same modules; values loaded next
    model.load_state_dict(torch.load(args.load, weights_only=False), assign=True)
    ids = test_tokens(tokenizer).reshape(-1)
    record: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "load_average_start": os.getloadavg(), "torch": torch.__version__,
        "model": "SmolLM2-135M fp32, quantize_model w4g64 act sequential (P1 calibration)"}
    diffs, agree, total = [], 0, 0
    with torch.no_grad():
        for w in range(args.logit_windows):
            x = ids[w * args.seq_len:(w + 1) * args.seq_len].unsqueeze(0)
            with cpu_kernel("exact"):
                exact = model(input_ids=x, use_cache=False).logits
            fast = model(input_ids=x, use_cache=False).logits
            diffs.append(float((exact - fast).abs().max()))
            agree += int((exact.argmax(-1) == fast.argmax(-1)).sum())
            total += exact.shape[1]
            record["logit_abs_max"] = float(exact.abs().max())
    record.update(max_abs_logit_diff=max(diffs), argmax_agreement=agree / total,
                  logit_windows=args.logit_windows)
    print(record, flush=True)
    for name, mode in (("exact", "exact"), ("default", "auto")):
        t0 = time.perf_counter()
        with cpu_kernel(mode):
            losses = window_losses(model, ids, args.windows, args.seq_len, progress=True)
        record[name] = {"ppl": float(torch.tensor(losses, dtype=torch.float64).mean().exp()),
                        "eval_seconds": time.perf_counter() - t0, "window_losses": losses}
        print(name, record[name]["ppl"], flush=True)
    record["load_average_end"] = os.getloadavg()
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
