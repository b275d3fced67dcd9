"""One row of the P1 accuracy benchmark (``../shared/BENCHMARK-PROTOCOL.md``).

SmolLM2-135M-Instruct fp32 on CPU; every decoder ``nn.Linear`` quantized (not embeddings,
not lm_head); calibration 128 × 512 tokens of wiki.valid.tokens (seed 0); perplexity on the
first 40 windows × 2048 tokens of wiki.test.raw.

    python benchmarks/p1.py --method babai --bits 4 --group-size 64 --order act \
        --mode sequential --out runs/babai-w4g64-act-seq.json

``--method float`` evaluates the float model; ``rtn`` is ``quantize_weight`` with ``H = I``
(round-to-nearest on the same grid); ``babai`` runs ``quantize_model`` (``--mode sequential``:
each block calibrated on the outputs of the quantized blocks before it; ``--mode observe``:
Hessians of the float model only, as torchao's observe/convert flow). The JSON records PPL,
wall times (calibrate + quantize, evaluation), threads, date, average stored bits per weight
and the per-layer certificate rows.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from babai_ao import quantize_weight
from babai_ao.calibration.data import calibration_windows, test_tokens
from babai_ao.calibration.evaluate import window_losses
from babai_ao.calibration.models import load_smollm2
from babai_ao.calibration.sequential import install, quantize_model
from babai_ao.cli.runs import (
    certificate_rows,
    decoder_linears,
    report_rows,
    stored_bits_per_weight,
)


def rtn(model: torch.nn.Module, config: Any) -> list[dict[str, Any]]:
    rows = []
    for name, lin in decoder_linears(model):
        qw = quantize_weight(lin.weight.detach(), None, bits=config.bits,
                             group_size=config.group_size, symmetric=config.symmetric,
                             clip=config.clip)
        install(lin, qw)
        rows.append({"name": name, "bits_per_weight": qw.certificate.bits_per_weight,
                     "clipped": qw.certificate.clipped})
    return rows


def torchao_observe_convert(model: torch.nn.Module, config: Any, calibration: torch.Tensor,
                            batch_size: int) -> list[dict[str, Any]]:
    """torchao's two steps on the decoder linears; rows from the installed certificates."""
    from torchao.quantization import quantize_

    from babai_ao.ao.config import babai_config

    fqns = {name for name, _ in decoder_linears(model)}
    only = lambda m, fqn: fqn in fqns  # noqa: E731  (not lm_head: tied to the embeddings)
    fields = {f: getattr(config, f) for f in ("bits", "group_size", "symmetric", "order",
                                              "clip", "damp", "refine", "search", "k")}
    quantize_(model, babai_config(**fields, step="observe"), filter_fn=only)
    with torch.no_grad():
        for ids in calibration.split(batch_size):
            model.model(input_ids=ids, use_cache=False)  # decoder only: lm_head is not needed
    quantize_(model, babai_config(**fields, step="convert"), filter_fn=only)
    return certificate_rows(model)


def make_config(args: argparse.Namespace) -> tuple[Any, str]:
    fields = {"bits": args.bits, "group_size": args.group_size, "symmetric": args.symmetric,
              "order": args.order, "clip": not args.no_clip, "damp": args.damp,
              "refine": args.refine, "search": args.search, "k": args.k}
    if args.format != "grid":  # babai_config validates the combination
        fields.update(clip=args.format, target_bits=args.target_bits,
                      outlier_density=args.outlier_density)
    try:
        from babai_ao.ao.config import babai_config

        return babai_config(**fields), "babai_config"
    except ImportError:
        return SimpleNamespace(**fields), "namespace (babai_ao.ao.config not available)"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", choices=("float", "rtn", "babai"), required=True)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--order", choices=("natural", "act", "min-pivot"), default="act")
    p.add_argument("--mode", choices=("sequential", "observe", "torchao"), default="sequential",
                   help="torchao: quantize_(step='observe'), calibration forwards of the "
                   "decoder, quantize_(step='convert'): the user-facing form of 'observe'")
    p.add_argument("--symmetric", action="store_true")
    p.add_argument("--no-clip", action="store_true", help="unbounded codes (E <= B holds)")
    p.add_argument("--format", choices=("grid", "hptq", "ssqr"), default="grid",
                   help="no-clipping storage formats (sequential/observe modes)")
    p.add_argument("--target-bits", type=float, help="hptq: average stored bits per weight")
    p.add_argument("--outlier-density", type=float, help="ssqr: fraction of outliers")
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--refine", type=int, default=0,
                   help="coordinate-descent sweeps after Babai (babai_ao.lattice.refine)")
    p.add_argument("--tune-steps", type=int, default=0,
                   help="block tuning: Adam steps per block on scales/norms after the codes "
                        "are fixed (babai_ao.calibration.tuning; 0: off)")
    p.add_argument("--tune-lr", type=float, default=2e-3)
    p.add_argument("--tune-windows", type=int, default=2, help="calibration windows per step")
    p.add_argument("--search", choices=("babai", "kbest"), default="babai",
                   help="kbest: K-best back-substitution (babai_ao.lattice.kbest)")
    p.add_argument("--k", type=int, default=16, help="K-best survivors per row")
    p.add_argument("--allocate", action="store_true",
                   help="hptq: per-layer bits from one λ (babai_ao.calibration.allocation)")
    p.add_argument("--fisher-windows", type=int, default=16,
                   help="--allocate: calibration windows of the Fisher sensitivity probe")
    p.add_argument("--calib-n", type=int, default=128)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--forward-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="sequential mode: dtype of the calibration forwards (Hessians fp32)")
    p.add_argument("--hessian-tiles", action=argparse.BooleanOptionalAction, default=True,
                   help="Hessians from their upper tiles, mirrored (the library default since "
                        "2026-12-05; --no-hessian-tiles: plain XᵀX, as rows before it)")
    p.add_argument("--cpu-kernel", choices=("exact", "auto"), default="exact",
                   help="evaluation forwards on CPU: exact fp32 path (default: P1 rows stay "
                        "comparable) or the default bf16-activation int4pack path")
    p.add_argument("--out", required=True)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    progress = not args.no_progress

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "protocol": "P1", "method": args.method, "command": " ".join(["python", *sys.argv]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "load_average_start": os.getloadavg(), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "git": git_commit(),
    }
    model, tokenizer = load_smollm2()
    from babai_ao.lattice.hessian import tiling

    tiling(args.hessian_tiles).__enter__()  # every Hessian of this run (a script: kept)
    record["hessian_tiles"] = args.hessian_tiles
    if args.method != "float":
        config, config_kind = make_config(args)
        record.update(bits=args.bits, group_size=args.group_size, symmetric=args.symmetric,
                      clip=not args.no_clip, damp=args.damp, refine=args.refine,
                      config=config_kind)
        t0 = time.perf_counter()
        if args.method == "rtn":
            rows = rtn(model, config)
            record["quant_seconds"] = time.perf_counter() - t0
        else:
            cal = calibration_windows(tokenizer, n=args.calib_n, seq_len=args.calib_len)
            record["calibration"] = {
                "n": args.calib_n, "seq_len": args.calib_len, "seed": 0,
                "sha256_ids": hashlib.sha256(cal.numpy().tobytes()).hexdigest()[:16]}
            if args.mode == "torchao" and args.allocate:
                raise SystemExit("--allocate runs with --mode sequential or observe")
            if args.mode == "torchao":
                rows = torchao_observe_convert(model, config, cal, args.batch_size)
                record["quant_seconds"] = time.perf_counter() - t0
                record.update(order=args.order, mode=args.mode)
            else:
                from babai_ao.calibration.tuning import TuneSettings

                tune = TuneSettings(steps=args.tune_steps, lr=args.tune_lr,
                                    windows=args.tune_windows)
                options = {"mode": args.mode, "batch_size": args.batch_size,
                           "progress": progress, "tune": tune if tune.steps else None}
                if args.forward_dtype != "float32":
                    options["forward_dtype"] = getattr(torch, args.forward_dtype)
                if args.allocate:  # one λ first, then the same calibration and tuning
                    from babai_ao.calibration.allocation import quantize_model_allocated

                    report, layer_bits = quantize_model_allocated(
                        model, config, cal, fisher_windows=args.fisher_windows, **options)
                    record["allocation"] = layer_bits.summary()
                else:
                    report = quantize_model(model, config, cal, **options)
                record["tune"] = {"steps": tune.steps, "lr": tune.lr, "windows": tune.windows,
                                  "blocks": report.tuning}
                record.update(forward_dtype=args.forward_dtype)
            if args.mode != "torchao":
                record["quant_seconds"] = time.perf_counter() - t0  # windows + calibration
                record.update(order=args.order, mode=args.mode, search=args.search,
                              k=args.k if args.search == "kbest" else None,
                              allocate=args.allocate,
                              solver_seconds=report.solver_seconds,
                              calibrate_quantize_seconds=report.seconds)
                rows = report_rows(report)
            applicable = [r for r in rows if r["clipped"] == 0]
            record["bound_checks"] = {"E_le_B": sum(bool(r["bound_holds"]) for r in applicable),
                                      "applicable_unclipped": len(applicable),
                                      "layers": len(rows)}
        record["layers"] = rows
        record["certificate_bits_per_weight"] = (
            sum(r["bits_per_weight"] for r in rows) / len(rows))
        record["avg_bits_per_weight"] = stored_bits_per_weight(model)  # stored bytes · 8 / weights
        record["clipped_total"] = sum(r["clipped"] for r in rows)
        if args.format != "grid":
            from babai_ao.ao.hptq_tensor import decode_model

            record.update(format=args.format, target_bits=args.target_bits,
                          outlier_density=args.outlier_density,
                          bits=args.bits if args.format == "ssqr" else "entropy-coded")
            decode_model(model)  # HPTQ: decode the streams once for the evaluation
    ids = test_tokens(tokenizer)
    t0 = time.perf_counter()
    losses = window_losses(model, ids, args.windows, args.seq_len, progress, args.cpu_kernel)
    record.update(eval_seconds=time.perf_counter() - t0, windows=args.windows,
                  cpu_kernel=args.cpu_kernel,
                  seq_len=args.seq_len, test_tokens=ids.numel(), window_losses=losses,
                  ppl=float(torch.tensor(losses, dtype=torch.float64).mean().exp()),
                  load_average_end=os.getloadavg())
    out.write_text(json.dumps(record, indent=1))
    print(f"{args.method} PPL(P1) = {record['ppl']:.3f}  -> {out}")


if __name__ == "__main__":
    main()
