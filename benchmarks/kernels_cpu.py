"""Compiled CPU decode speed: float (fp32, bf16), torchao's CPU int4, babai-ao 4-bit (the
default path on an fp32 model and on a bf16 model, ``prepare_cpu``, the exact path) and
HPTQ 3.3 bits (the default path on an fp32 model — each group's 16-code window as nibbles
plus a sparse correction in one C++ op, ``kernels/cpu_hptq.py`` — and ``prepare_cpu`` on a
bf16 model),
side by side in one process, with the memory bandwidth each row reaches. The "default"
rows are what a user gets with no extra call: ``quantize_`` then ``torch.compile``.

``--model smollm2`` (default): SmolLM2-135M, every decoder linear quantized (the lm_head is
tied to the embeddings and stays float). ``--model llama-1b``: a Llama-3.2-1B-shaped model
with random weights (``benchmarks/decode_llama.py``, torch only), every linear quantized,
the output head included (the embedding stays float: a decode step reads one of its rows).
Quantization is round-to-nearest on the babai grid (``quantize_(model, babai_config(bits=4,
group_size=64))`` without calibration: the speed does not depend on the codes).

Decode step: ``--generate N`` decodes N tokens greedily through a compiled static-KV-cache
step, timed per token (SmolLM2: ``babai_ao.export.llm.static_cache_module``; Llama: the
model's own cache); without it (SmolLM2 only) one token at batch 1 without a cache. SmolLM2
variants live side by side and are timed in interleaved rounds (median per variant); the
exact-path variant runs after them on its own (changing the CPU kernel mode drops every
compiled graph). The 1B variants do not fit in memory together on a small box: each is built, timed and freed
in turn (``--sequential``, default for llama-1b), and the copy bandwidth is measured right
before each, so each row's share of it is read against the same load.

Bandwidth: a decode step reads every weight once; "weight GB/s" = bytes read per token ×
tokens/s, with the bytes of what the kernel reads (the int4pack layout for babai's default
path, torchao's packed tensors, the float weights; embedding rows and the KV cache — ≤ N
positions — are left out). Copy bandwidth: the best of several ``copy_`` (read + write
counted) and ``sum`` (read only) passes over a 512 MiB tensor.

    .venv/bin/python benchmarks/kernels_cpu.py --generate 32 --rounds 3
    .venv/bin/python benchmarks/kernels_cpu.py --model llama-1b --generate 16 --rounds 2 \\
        --cache /tmp/kernels_cpu --json benchmarks/results/kernels_cpu_llama1b.json
    .venv/bin/python benchmarks/kernels_cpu.py --model llama-tiny --generate 4 --rounds 1  # smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))


# ---- models -----------------------------------------------------------------------------
def _smollm2(dtype: torch.dtype, layers: int) -> nn.Module:
    from babai_ao.calibration.models import load_smollm2

    model, _ = load_smollm2(num_layers=layers)
    return model.to(dtype)


def _llama(config: str, dtype: torch.dtype, max_seq: int) -> nn.Module:
    from decode_llama import CONFIGS, Llama

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: no fp32 copy of a 1B model first
    try:
        model = Llama(CONFIGS[config], max_seq)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for lin in (m for m in model.modules() if isinstance(m, nn.Linear)):
            lin.weight.normal_(std=0.02)
    return model.eval()


def _linear_filter(model_name: str) -> Callable[[nn.Module, str], bool]:
    if model_name == "smollm2":  # lm_head is tied to the embedding table: stays float
        return lambda m, fqn: isinstance(m, nn.Linear) and "lm_head" not in fqn
    return lambda m, fqn: isinstance(m, nn.Linear)


# ---- variants ---------------------------------------------------------------------------
def variant_builders(args) -> dict[str, tuple[Callable[[], nn.Module], str]]:
    """name → (build the model, cpu_kernel mode to run it under)."""
    from torchao.quantization import quantize_

    from babai_ao import babai_config, prepare_cpu

    gs = args.group_size
    only = _linear_filter(args.model)

    def base(dtype):
        if args.model == "smollm2":
            return lambda: _smollm2(dtype, args.layers)
        return lambda: _llama(args.model.removeprefix("llama-"), dtype, args.generate or 8)

    def quantized(tag: str, dtype, config) -> nn.Module:
        """``base(dtype)`` quantized with ``config``, from ``--cache`` when it is there
        (quantizing a 1B model, or HRTN's rate search, takes minutes: not in a timing
        window)."""
        cached = None
        if args.cache:
            layers = args.layers if args.model == "smollm2" else ""
            cached = (Path(args.cache) / f"{args.model}-{layers}-{tag}-"
                      f"{str(dtype).removeprefix('torch.')}.pt")
            if cached.is_file():
                return torch.load(cached, weights_only=False)
        m = base(dtype)()
        quantize_(m, config, filter_fn=only)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.save(m, cached.with_suffix(".tmp"))
            cached.with_suffix(".tmp").replace(cached)  # never a half-written cache file
        return m

    def babai(dtype, prepare=False):
        def build():
            m = quantized(f"w4g{gs}", dtype, babai_config(bits=4, group_size=gs))
            if prepare:
                prepare_cpu(m)
            return m
        return build

    def hptq(dtype, prepare=False):
        def build():
            m = quantized("hptq3.3", dtype, babai_config(clip="hptq", target_bits=3.3))
            if prepare:
                prepare_cpu(m)  # nibbles + sparse where it pays, else 8-bit rows
            return m
        return build

    def torchao_int4():
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        m = base(torch.bfloat16)()
        quantize_(m, PrototypeInt4WeightOnlyConfig(group_size=gs), filter_fn=only)
        return m

    out = {
        "fp32": (base(torch.float32), "auto"),
        "bf16": (base(torch.bfloat16), "auto"),
        f"torchao int4 g{gs} (bf16 model, Int4OpaqueTensor)": (torchao_int4, "auto"),
        f"babai 4-bit g{gs}, fp32 model, default (int4pack, bf16 act)":
            (babai(torch.float32), "auto"),
        f"babai 4-bit g{gs}, bf16 model, default (int4pack)": (babai(torch.bfloat16), "auto"),
        f"babai 4-bit g{gs}, bf16 model, prepare_cpu": (babai(torch.bfloat16, True), "auto"),
    }
    if not args.no_hptq:
        out["babai HPTQ 3.3 bits, fp32 model, default (C++ nibbles + sparse, fp32 act)"] = (
            hptq(torch.float32), "auto")
        out["babai HPTQ 3.3 bits, bf16 model, prepare_cpu"] = (hptq(torch.bfloat16, True),
                                                               "auto")
    if args.exact:
        out[f"babai 4-bit g{gs}, fp32 model, cpu_kernel('exact') (fp32 dequant+mm)"] = (
            babai(torch.float32), "exact")
    return out


# ---- bytes read per decode step, bandwidth ------------------------------------------------
def _tensor_bytes(t: torch.Tensor) -> int:
    if hasattr(t, "cpu_layout"):  # BabaiQuantizedTensor, HuffmanQuantizedTensor
        layout = t.cpu_layout()
        if layout is not None:  # the default CPU path reads its layout only
            return sum(x.numel() * x.element_size() for x in layout)
        return t.nbytes_stored
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        return sum(_tensor_bytes(getattr(t, n)) for n in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of every linear-like module's tensors (what one decode step reads)."""
    total, seen = 0, set()
    for mod in model.modules():
        if not (isinstance(mod, nn.Linear) or type(mod).__name__.endswith(
                ("PackLinear", "SparseLinear"))):
            continue
        for t in [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]:
            if id(t) not in seen:
                seen.add(id(t))
                total += _tensor_bytes(t)
    return total


def copy_bandwidth(mib: int = 512, repeats: int = 5) -> dict[str, float]:
    """GB/s of the best of ``repeats`` copies into a touched buffer (bytes read + written)
    and sums (read only)."""
    a = torch.ones(mib * 2**20 // 4)
    b = torch.zeros_like(a)  # written once here: no page faults in the timed copies
    nbytes = a.numel() * 4
    clone = read = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        b.copy_(a)
        clone = min(clone, time.perf_counter() - t0)
        t0 = time.perf_counter()
        a.sum()
        read = min(read, time.perf_counter() - t0)
    return {"copy_GBps": 2 * nbytes / clone / 1e9, "read_GBps": nbytes / read / 1e9}


# ---- timing -----------------------------------------------------------------------------
def _smollm2_runner(model: nn.Module, args) -> Callable[[], object]:
    if not args.generate:
        step = torch.compile(model, fullgraph=True)
        ids = torch.tensor([[1]])

        def run_steps() -> None:
            for _ in range(args.steps):
                step(ids)
        return run_steps
    from babai_ao.export.llm import static_cache_module

    step = torch.compile(static_cache_module(model, args.generate))

    def run() -> list[int]:
        out, tok = [], 1
        for pos in range(args.generate):
            logits = step(input_ids=torch.tensor([[tok]]), cache_position=torch.tensor([pos]))
            tok = int(logits[0, -1].argmax())
            out.append(tok)
        return out
    return run


def _llama_runner(model: nn.Module, args) -> Callable[[], object]:
    step = torch.compile(model, fullgraph=True)

    def run() -> None:
        tok = torch.zeros(1, 1, dtype=torch.long)
        for i in range(args.generate):
            tok = step(tok, torch.tensor([i]))[..., -1, :].argmax(-1, keepdim=True)
    return run


def _runner(model: nn.Module, mode: str, args) -> Callable[[], object]:
    from babai_ao import cpu_kernel

    inner = (_smollm2_runner if args.model == "smollm2" else _llama_runner)(model, args)

    def run() -> object:
        with torch.no_grad(), cpu_kernel(mode):
            return inner()
    return run


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=("smollm2", "llama-1b", "llama-tiny"), default="smollm2")
    p.add_argument("--layers", type=int, default=30, help="SmolLM2 blocks")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--generate", type=int, default=0,
                   help="time greedy decoding of N tokens with a static KV cache")
    p.add_argument("--sequential", action="store_true",
                   help="build, time and free one variant at a time (default for llama-1b)")
    p.add_argument("--exact", action="store_true", help="add the exact fp32 path (slow)")
    p.add_argument("--no-hptq", action="store_true")
    p.add_argument("--cache", metavar="DIR",
                   help="keep the quantized models here (torch.save) and reuse them")
    p.add_argument("--build-cache", action="store_true",
                   help="only build the --cache files of the selected variants, time nothing")
    p.add_argument("--only", help="comma-separated substrings (';'-separated when one holds "
                   "a comma): keep matching variants")
    p.add_argument("--json")
    args = p.parse_args()
    if args.model != "smollm2" and not args.generate:
        p.error("the Llama models decode with their own static cache: give --generate N")
    sequential = args.sequential or args.model == "llama-1b"
    builders = variant_builders(args)
    if args.only:
        keys = args.only.split(";" if ";" in args.only else ",")
        builders = {k: v for k, v in builders.items() if k in ("fp32", "bf16") or any(
            s in k for s in keys)}
    if args.build_cache:
        if not args.cache:
            p.error("--build-cache needs --cache DIR")
        for name, (build, _) in builders.items():
            if name.startswith("babai"):  # prepare_cpu variants: loaded, then prepared
                t0 = time.perf_counter()
                build()
                gc.collect()
                print(f"{name}: cached in {time.perf_counter() - t0:.0f} s", flush=True)
        return
    per_call = args.generate or args.steps
    rows: dict[str, dict] = {}
    record = {"model": args.model, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "load_average_start": os.getloadavg(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "machine": platform.processor() or platform.machine(),
              "generate": args.generate, "rounds": args.rounds, "sequential": sequential,
              "copy_bandwidth_start": copy_bandwidth()}
    print(f"copy bandwidth: {record['copy_bandwidth_start']}", flush=True)

    def prepare(name, build, mode):
        t0 = time.perf_counter()
        model = build()
        build_s = time.perf_counter() - t0
        run = _runner(model, mode, args)
        t0 = time.perf_counter()
        run()
        run()  # compile + warm-up (the int4pack layouts are built here)
        nbytes = weight_bytes_per_token(model)
        rows[name] = {"times": [], "bytes_per_token": nbytes, "build_s": build_s,
                      "compile_warmup_s": time.perf_counter() - t0}
        print(f"{name}: built in {build_s:.1f} s, compiled + warm in "
              f"{rows[name]['compile_warmup_s']:.1f} s, {nbytes / 1e6:.1f} MB/token", flush=True)
        return model, run

    def timed(name, run):
        t0 = time.perf_counter()
        run()
        rows[name]["times"].append((time.perf_counter() - t0) / per_call)

    # a cpu_kernel mode change drops every compiled graph: other modes run on their own
    later = {k: v for k, v in builders.items() if sequential or v[1] != "auto"}
    runs = {}
    for name, (build, mode) in builders.items():
        if name in later:
            continue
        try:
            runs[name] = prepare(name, build, mode)[1]
        except Exception as e:  # reported, not fatal
            print(f"{name}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            rows.pop(name, None)
    for _ in range(args.rounds):
        for name, run in runs.items():
            timed(name, run)
    for name, (build, mode) in later.items():
        model = run = None
        try:
            bw = copy_bandwidth()
            model, run = prepare(name, build, mode)
            rows[name]["copy_bandwidth"] = bw
            for _ in range(args.rounds):
                timed(name, run)
        except Exception as e:  # reported, not fatal
            print(f"{name}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            rows.pop(name, None)
        del model, run  # free this variant before building the next
        gc.collect()
        torch.compiler.reset()
    record["copy_bandwidth_end"] = copy_bandwidth()
    record["load_average_end"] = os.getloadavg()
    unit = (f"greedy decode of {args.generate} tokens, static KV cache" if args.generate
            else "1 token/step, no KV cache")
    print(f"\n{args.model}, batch 1, {unit}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {record['machine']}, "
          f"{'sequential' if sequential else 'interleaved'} rounds: {args.rounds}")
    ref = statistics.median(rows["bf16"]["times"]) if "bf16" in rows else None
    print("| variant | ms/token (median) | tokens/s | vs bf16 | MB read/token | weight GB/s "
          "| % of read bw |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        med = statistics.median(row["times"])
        gbps = row["bytes_per_token"] / med / 1e9
        bw = row.get("copy_bandwidth", record["copy_bandwidth_start"])["read_GBps"]
        row.update(ms_per_token=med * 1e3, tokens_per_s=1 / med, weight_GBps=gbps,
                   vs_bf16=(ref / med) if ref else None, share_of_read_bw=gbps / bw)
        vs = f"{ref / med:.2f}x" if ref else "-"
        print(f"| {name} | {med * 1e3:.1f} | {1 / med:.2f} | {vs} | "
              f"{row['bytes_per_token'] / 1e6:.0f} | {gbps:.1f} | {100 * gbps / bw:.0f} % |")
    print(f"copy bandwidth start {record['copy_bandwidth_start']}, end "
          f"{record['copy_bandwidth_end']}; load {record['load_average_start']} -> "
          f"{record['load_average_end']}")
    if args.json:
        record["rows"] = rows
        Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
