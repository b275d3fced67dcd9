"""Export benchmark: .pte/.onnx sizes and per-token decode latency of SmolLM2-135M.

fp32 vs babai 4-bit (symmetric, group 32: the 8da4w ExecuTorch path and ONNX QDQ/MatMulNBits)
vs 3-bit (group 32: ExecuTorch weight-only, ONNX portable unpack), all in one run. Decode:
an 8-token prompt then 32 greedy tokens, static cache of 64, one token per call; latency is
the median over the 32 generated tokens. Results are appended stage by stage to a JSON file.
Weights are RTN on the babai grid (``BabaiQuantizedTensor.from_hp``): sizes and speed do not
depend on how the codes were chosen. Embedding/lm_head (tied) stay float32, except in the
``*_emb4`` stages: there ``babai_ao.quantize_embeddings_`` rounds the tied table to 4 bits,
group 64, symmetric like the decoder linears (so 8da4w needs no zero-point correction); the
lookup runs ``quantized_decomposed::embedding_4bit`` (.pte) or ``GatherBlockQuantized``
(.onnx) and the lm_head the same 4-bit path as the other linears.

    .venv/bin/python benchmarks/export_bench.py --out /tmp/export_bench [--layers 30]
    .venv/bin/python benchmarks/export_bench.py --out /tmp/export_bench --only onnx_fp32,\
        pte_fp32,onnx_4bit_qdq_emb4,onnx_4bit_mmnb_emb4,pte_4bit_8da4w_emb4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from babai_ao.export import llm
from babai_ao.export.generate import executorch_step, greedy, onnx_step

from babai_ao.ao.embedding import quantize_embeddings_
from babai_ao.ao.tensor import BabaiQuantizedTensor
from babai_ao.calibration.models import load_smollm2

PROMPT = [1, 504, 3575, 282, 4649, 314, 2613, 28]
N_NEW, CACHE = 32, 64


def quantized(bits: int, symmetric: bool, layers: int | None, emb_bits: int | None = None
              ) -> torch.nn.Module:
    model, _ = load_smollm2(num_layers=layers)
    for mod in model.model.layers.modules():
        if isinstance(mod, torch.nn.Linear):
            w = BabaiQuantizedTensor.from_hp(mod.weight.detach(), bits=bits, group_size=32,
                                             symmetric=symmetric)
            mod.weight = torch.nn.Parameter(w, requires_grad=False)
    if emb_bits is not None:
        quantize_embeddings_(model, bits=emb_bits, group_size=64, symmetric=symmetric)
    return model


def timed_decode(step) -> tuple[list[int], float]:
    """Greedy tokens and the median seconds per generated token."""
    times: list[float] = []

    def timed(tok: int, pos: int):
        t = time.perf_counter()
        out = step(tok, pos)
        if pos >= len(PROMPT):
            times.append(time.perf_counter() - t)
        return out

    tokens = greedy(timed, PROMPT, N_NEW, CACHE)
    return tokens, statistics.median(times)


def markdown(results: dict) -> str:
    """The results as a markdown table (size relative to the fp32 file of the same target)."""
    rows = ["| artifact | size MiB | × smaller than fp32 | decode ms/token | export s |",
            "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        fp32 = results.get(("onnx" if name.startswith("onnx") else "pte") + "_fp32")
        ratio = f"{fp32['size_bytes'] / r['size_bytes']:.2f}" if fp32 else "–"
        rows.append(f"| {name} | {r['size_bytes'] / 2**20:.1f} | {ratio} | "
                    f"{r['ms_per_token']:.1f} | {r['export_s']:.0f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("/tmp/export_bench"))
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip", default="", help="comma-separated stage names to skip")
    ap.add_argument("--only", default="", help="comma-separated stage names to run (all)")
    ap.add_argument("--report", action="store_true", help="print the markdown table and exit")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    skip = set(filter(None, args.skip.split(",")))
    only = set(filter(None, args.only.split(",")))
    if args.report:
        print(markdown(results))
        return

    stages = [  # name, bits (None: fp32), symmetric, target, mode/format, embedding bits
        ("onnx_fp32", None, False, "onnx", "qdq", None),
        ("onnx_4bit_qdq", 4, True, "onnx", "qdq", None),
        ("onnx_4bit_mmnb", 4, True, "onnx", "matmulnbits", None),
        ("onnx_4bit_mmnb_int8", 4, True, "onnx", "matmulnbits-int8", None),
        ("onnx_3bit", 3, False, "onnx", "qdq", None),
        ("onnx_4bit_qdq_emb4", 4, True, "onnx", "qdq", 4),
        ("onnx_4bit_mmnb_emb4", 4, True, "onnx", "matmulnbits", 4),
        ("onnx_4bit_mmnb_int8_emb4", 4, True, "onnx", "matmulnbits-int8", 4),
        ("pte_fp32", None, False, "executorch", "weight_only", None),
        ("pte_4bit_8da4w", 4, True, "executorch", "8da4w", None),
        ("pte_3bit_weight_only", 3, False, "executorch", "weight_only", None),
        ("pte_4bit_8da4w_emb4", 4, True, "executorch", "8da4w", 4),
    ]
    for name, bits, sym, target, mode, emb_bits in stages:
        if name in skip or name in results or (only and name not in only):
            continue
        model = (load_smollm2(num_layers=args.layers)[0] if bits is None
                 else quantized(bits, sym, args.layers, emb_bits))
        t0 = time.perf_counter()
        if target == "onnx":
            fmt, _, int8 = mode.partition("-")  # "-int8": MatMulNBits accuracy_level 4
            path = llm.export_llm_onnx(model, args.out / f"{name}.onnx", CACHE, format=fmt,
                                       accuracy_level=4 if int8 else 1)
            step = onnx_step(path, threads=args.threads)
        else:
            path = llm.export_llm_executorch(model, args.out / f"{name}.pte", CACHE, mode=mode)
            step = executorch_step(path)
        export_s = time.perf_counter() - t0
        tokens, per_tok = timed_decode(step)
        results[name] = {"size_bytes": path.stat().st_size, "export_s": export_s,
                         "ms_per_token": 1e3 * per_tok, "tokens": tokens}
        results_path.write_text(json.dumps(results, indent=1))
        print(name, results[name]["size_bytes"] / 2**20, "MiB",
              f"{1e3 * per_tok:.1f} ms/token", f"export {export_s:.0f}s", flush=True)
        path.unlink()  # keep the disk free; the size is recorded


if __name__ == "__main__":
    main()
