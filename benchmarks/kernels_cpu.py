"""Compiled SmolLM2 decode-step speed on CPU: 4-bit ``BabaiQuantizedTensor`` weights
(``babai::linear``: exact fp32 dequant+mm path, and the int4pack path for bf16 activations)
vs fp32 / bf16 and torchao's CPU int4 (``PrototypeInt4WeightOnlyConfig``, Int4OpaqueTensor),
side by side in one process.

Decode step = compiled forward of one token at batch 1 with no KV cache: the same weight
traffic as a decode step (every linear reads its full weight), without attention over a
cache (negligible for 135M at short context). Variants are timed in interleaved rounds and
the median per variant is reported, because the CPU is shared.

    .venv/bin/python benchmarks/kernels_cpu.py [--layers 30] [--rounds 5] [--steps 10]
    .venv/bin/python benchmarks/kernels_cpu.py --generate 32 --rounds 3   # real decoding

``--generate N``: each variant decodes N tokens greedily from BOS through a compiled
static-KV-cache step (``babai_ao.export.llm.static_cache_module``), timed per token.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch


def _variants(base, args):
    from torchao.quantization import quantize_

    from babai_ao import babai_config, prepare_cpu

    def linears(m, name):
        return isinstance(m, torch.nn.Linear) and "lm_head" not in name

    bf16 = copy.deepcopy(base).to(torch.bfloat16)
    out = {"fp32": base, "bf16": bf16}
    for label, model in (("fp32 act, exact dequant+mm", base), ("bf16 act, int4pack", bf16)):
        q = copy.deepcopy(model)  # no calibration: round-to-nearest on the same grid
        quantize_(q, babai_config(bits=4, group_size=args.group_size), filter_fn=linears)
        out[f"babai 4-bit g{args.group_size} ({label})"] = q
    prepared = copy.deepcopy(q)
    prepare_cpu(prepared)
    out[f"babai 4-bit g{args.group_size} (bf16 act, prepare_cpu)"] = prepared
    hptq = copy.deepcopy(bf16)  # HRTN (no calibration) at 3.3 bits, decoded to int8 rows
    quantize_(hptq, babai_config(clip="hptq", target_bits=3.3), filter_fn=linears)
    prepare_cpu(hptq)
    out["babai HPTQ 3.3 bits (bf16 act, prepare_cpu: int8 rows)"] = hptq
    try:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        t = copy.deepcopy(bf16)
        quantize_(t, PrototypeInt4WeightOnlyConfig(group_size=args.group_size), filter_fn=linears)
        out[f"torchao int4 opaque g{args.group_size} (bf16 act)"] = t
    except Exception as e:  # reported, not fatal
        print(f"torchao int4 CPU path unavailable: {type(e).__name__}: {str(e)[:200]}")
    return out


def _step(fn, ids: torch.Tensor, steps: int):
    def run() -> None:
        for _ in range(steps):
            fn(ids)
    return run


def _generation(model: torch.nn.Module, tokens: int):
    """Greedy decode of ``tokens`` tokens from BOS through a compiled static-cache step."""
    from babai_ao.export.llm import static_cache_module

    step = torch.compile(static_cache_module(model, tokens))

    def run() -> list[int]:
        out, tok = [], 1
        for pos in range(tokens):
            logits = step(input_ids=torch.tensor([[tok]]), cache_position=torch.tensor([pos]))
            tok = int(logits[0, -1].argmax())
            out.append(tok)
        return out
    return run


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--generate", type=int, default=0,
                   help="time greedy decoding of N tokens with a static KV cache instead")
    args = p.parse_args()
    from babai_ao.calibration.models import load_smollm2

    base, _ = load_smollm2(num_layers=args.layers)
    models = _variants(base, args)
    ids = torch.tensor([[1]])
    fns, times = {}, {name: [] for name in models}
    with torch.no_grad():
        for name, m in models.items():
            t0 = time.perf_counter()
            try:
                fns[name] = (_generation(m, args.generate) if args.generate else
                             _step(torch.compile(m, fullgraph=True), ids, args.steps))
                fns[name]()
                fns[name]()
            except Exception as e:
                print(f"{name}: compile/run failed: {type(e).__name__}: {str(e)[:200]}")
                fns.pop(name, None)
                del times[name]
                continue
            print(f"{name}: compiled in {time.perf_counter() - t0:.1f} s", flush=True)
        steps = args.generate or args.steps
        for _ in range(args.rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) / steps)
    unit = (f"greedy decode of {args.generate} tokens with a static KV cache" if args.generate
            else "1 token/step, no KV cache")
    print(f"\nSmolLM2-135M, {args.layers} layers, batch 1, {unit}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    ref = statistics.median(times["fp32"])
    print("| variant | ms/step (median) | tokens/s | vs fp32 |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med * 1e3:.2f} | {1 / med:.1f} | {ref / med:.2f}x |")


if __name__ == "__main__":
    main()
