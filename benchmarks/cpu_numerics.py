"""Numerics of the CPU kernels on a calibrated model: the default (int4pack, bf16
activations) vs the exact path (fp32 dequantize + fp32 matmul), P1 perplexity and logits.

SmolLM2-135M fp32, every decoder linear quantized w4g64: ``--method rtn`` (default; the P1
RTN row, ``benchmarks/p1.py --method rtn``: its exact-path PPL must equal that row's) or
``--method babai`` (``quantize_model``, P1 calibration 128 × 512 tokens, order act,
sequential; ≈ 15 min quiet, far longer on a loaded box; ``--save`` keeps the result). The same quantized model is
evaluated twice — under ``babai_ao.cpu_kernel("exact")`` and under the default — on the P1
windows (40 × 2048 tokens of wiki.test.raw), and the logits of the first ``--logit-windows``
windows are compared (max |Δ logit|, argmax agreement).

    python benchmarks/cpu_numerics.py --out benchmarks/results/cpu_numerics_rtn_w4g64.json
    python benchmarks/cpu_numerics.py --method babai --save /tmp/w4g64.pt   # quantize, save
    python benchmarks/cpu_numerics.py --load /tmp/w4g64.pt --out benchmarks/results/cpu_numerics_babai_w4g64.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import torch

from babai_ao import babai_config, cpu_kernel, quantize_model, quantize_weight
from babai_ao.calibration.data import calibration_windows, test_tokens
from babai_ao.calibration.evaluate import window_losses
from babai_ao.calibration.models import load_smollm2
from babai_ao.calibration.sequential import install
from babai_ao.cli.runs import decoder_linears


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--method", choices=("rtn", "babai"), default="rtn")
    p.add_argument("--save", help="quantize (babai) and torch.save the state dict here")
    p.add_argument("--load", help="load a state dict saved by --save")
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--logit-windows", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--out")
    args = p.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = load_smollm2()
    config = babai_config(bits=4, group_size=64, order="act")
    if args.method == "rtn" and not args.load:
        for _, lin in decoder_linears(model):  # as benchmarks/p1.py --method rtn
            install(lin, quantize_weight(lin.weight.detach(), None, bits=4, group_size=64))
    elif args.save:
        cal = calibration_windows(tokenizer, n=128, seq_len=512)
        quantize_model(model, config, cal, mode="sequential", batch_size=8)
        tmp = Path(args.save + ".part")
        torch.save(model.state_dict(), tmp)
        tmp.replace(args.save)
        print(f"saved -> {args.save}")
        return
    else:
        quantize_model(model, config, calibration_windows(tokenizer, n=1, seq_len=16),
                       mode="sequential", batch_size=1)  # the same modules; values next
        model.load_state_dict(torch.load(args.load, weights_only=False), assign=True)
    ids = test_tokens(tokenizer).reshape(-1)
    record: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "load_average_start": os.getloadavg(), "torch": torch.__version__,
        "method": args.method if not args.load else f"babai (loaded {args.load})",
        "model": "SmolLM2-135M fp32, decoder linears w4g64 asymmetric"}
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
