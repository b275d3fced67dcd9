"""HPTQ at 4-bit speed on CPU: compiled SmolLM2-135M decoding, side by side in one process —
bf16, our 4-bit g64 (``prepare_cpu`` → ``Int4PackLinear``), and HPTQ at 3.3 stored bits in
its two CPU forms: int8 rows (``Int8PackLinear``, the form before issue 23) and int4pack on
each group's 16-code window plus a sparse correction (``Int4SparseLinear``, ``cpu_hptq``).

HPTQ here is HRTN (``babai_config(clip="hptq", target_bits=3.3)`` without calibration): its
codes have the histogram of calibrated HPTQ (off-window share 0.12 % vs 0.10 % on blocks 0–5
of a sequentially calibrated model, BENCHMARKS.md), which is all the speed depends on.
Variants are timed in interleaved rounds, median per variant, because the CPU is shared.

    .venv/bin/python benchmarks/hptq_cpu.py [--layers 30] [--rounds 5] [--steps 5]
    .venv/bin/python benchmarks/hptq_cpu.py --generate 32 --rounds 3   # static KV cache
    ... --json benchmarks/results/hptq_cpu.json --cache /tmp/hptq_cpu   # reuse the models
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time

import torch


def _linears(module: torch.nn.Module, name: str) -> bool:
    return isinstance(module, torch.nn.Linear) and "lm_head" not in name


def _quantized(base: torch.nn.Module, config, cache: str | None, name: str) -> torch.nn.Module:
    """``base`` quantized by ``config`` (round to nearest), from ``cache/name.pt`` when there
    (the HPTQ rate search takes minutes on a shared CPU)."""
    from torchao.quantization import quantize_

    path = os.path.join(cache, f"{name}.pt") if cache else None
    if path and os.path.exists(path):
        return torch.load(path, weights_only=False)
    model = copy.deepcopy(base)
    quantize_(model, config, filter_fn=_linears)
    if path:
        os.makedirs(cache, exist_ok=True)
        torch.save(model, path + ".part")
        os.replace(path + ".part", path)
    return model


def variants(layers: int, cache: str | None = None) -> tuple[dict[str, torch.nn.Module], dict]:
    """The models to time, and facts about the HPTQ layers."""
    from babai_ao.kernels import cpu_hptq
    from babai_ao.kernels.cpu_hptq import Int4SparseLinear

    from babai_ao import babai_config, prepare_cpu
    from babai_ao.calibration.models import load_smollm2

    bf16, _ = load_smollm2(dtype=torch.bfloat16, num_layers=layers)
    four = _quantized(bf16, babai_config(bits=4, group_size=64), cache, f"w4g64-{layers}")
    counts4 = prepare_cpu(four)
    hptq = _quantized(bf16, babai_config(clip="hptq", target_bits=3.3), cache,
                      f"hrtn3.3-{layers}")
    stored = [m.weight.detach() for n, m in hptq.named_modules() if _linears(m, n)]
    bits = sum(w.nbytes_stored * 8 for w in stored) / sum(w.numel() for w in stored)
    int8 = copy.deepcopy(hptq)
    cpu_hptq.ENABLED = False
    try:
        counts8 = prepare_cpu(int8)
    finally:
        cpu_hptq.ENABLED = True
    counts_new = prepare_cpu(hptq)
    sparse = [m for m in hptq.modules() if isinstance(m, Int4SparseLinear)]
    facts = {
        "hptq_bits_per_weight": bits, "prepare_4bit": counts4, "prepare_hptq_int8": counts8,
        "prepare_hptq_int4_sparse": counts_new,
        "sparse_fraction": sum(m.sparse_count for m in sparse)
        / max(1, sum(m.in_features * m.out_features for m in sparse)),
        "group_sizes": sorted({m.group_size for m in sparse})}
    return {"bf16": bf16, "babai 4-bit g64, prepare_cpu (int4pack)": four,
            "HPTQ 3.3 bits, int8 rows (old form)": int8,
            "HPTQ 3.3 bits, int4pack + sparse (new form)": hptq}, facts


def generation(model: torch.nn.Module, tokens: int):
    """Greedy decoding of ``tokens`` tokens with a static KV cache, compiled (one step per
    token, as ``kernels_cpu.py --generate``)."""
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


def decode_steps(model: torch.nn.Module, steps: int):
    """``steps`` compiled forwards of one token, no KV cache (a decode step's weight traffic)."""
    step = torch.compile(model, fullgraph=True)
    ids = torch.tensor([[1]])

    def run() -> None:
        for _ in range(steps):
            step(ids)
    return run


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--generate", type=int, default=0,
                   help="time greedy decoding of N tokens with a static KV cache instead")
    p.add_argument("--json", default=None)
    p.add_argument("--cache", default=None,
                   help="folder to keep the quantized models in between runs")
    args = p.parse_args()
    load_start = os.getloadavg()
    models, facts = variants(args.layers, args.cache)
    per_call = args.generate or args.steps
    fns, times, tokens = {}, {name: [] for name in models}, {}
    with torch.no_grad():
        for name, model in models.items():
            t0 = time.perf_counter()
            fns[name] = (generation(model, args.generate) if args.generate
                         else decode_steps(model, args.steps))
            tokens[name] = fns[name]()
            fns[name]()
            print(f"{name}: compiled in {time.perf_counter() - t0:.1f} s", flush=True)
        for _ in range(args.rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) / per_call)
    unit = (f"greedy decode of {args.generate} tokens, static KV cache" if args.generate
            else "1 token/step, no KV cache")
    print(f"\nSmolLM2-135M, {args.layers} layers, batch 1, {unit}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"load {load_start[0]:.1f} → {os.getloadavg()[0]:.1f}")
    print(f"HPTQ: {facts['hptq_bits_per_weight']:.3f} stored bits/weight, "
          f"{facts['sparse_fraction'] * 100:.3f} % of weights in the sparse part, groups "
          f"{facts['group_sizes']}, prepare_cpu: {facts['prepare_hptq_int4_sparse']}")
    ref = statistics.median(times["babai 4-bit g64, prepare_cpu (int4pack)"])
    rows = []
    print("| variant | ms/token (median) | tokens/s | vs our 4-bit |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"variant": name, "ms": med * 1e3, "tokens_s": 1 / med, "vs_4bit": ref / med,
                     "all_ms": [t * 1e3 for t in ts]})
        print(f"| {name} | {med * 1e3:.2f} | {1 / med:.1f} | {ref / med:.3f}x |")
    if args.generate:
        same = tokens["HPTQ 3.3 bits, int8 rows (old form)"] == tokens[
            "HPTQ 3.3 bits, int4pack + sparse (new form)"]
        print(f"HPTQ old and new forms decode the same {args.generate} tokens: {same}")
        facts["same_tokens_old_new"] = same
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python benchmarks/hptq_cpu.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v),
                "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "torch": torch.__version__,
                "threads": torch.get_num_threads(), "load_start": load_start,
                "load_end": os.getloadavg(), **facts, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
