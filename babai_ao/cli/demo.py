"""``babai-ao demo``: the whole story on SmolLM2-135M in one command (CPU, a few minutes).

1. float model; perplexity on a small window set of WikiText-2 test (not P1: see
   BENCHMARKS.md for P1 numbers);
2. RTN at 4 bit g64 (``quantize_`` with ``babai_config``, no Hessian) and Babai at 4 bit g64,
   act-order, sequential calibration on a small calibration set; perplexity of each;
3. greedy generation with the Babai model under ``torch.compile`` (static KV cache), checked
   token for token against eager;
4. export of the Babai model's first blocks to ``.pte`` (ExecuTorch) and ``.onnx``, each run
   once, max |diff| of the logits against eager;
5. run records, ``report.md`` and PNG plots in the output directory (written atomically).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import torch

from babai_ao.errors import BabaiError

from .depth import load_measured
from .evaluate import evaluate
from .export import EXPORT_MODES, export_example, export_model
from .output import atomic_directory, say
from .quantize import make_config, quantize_loaded, summary
from .report import write_report
from .sources import SMOLLM2, keep_first_blocks

PROMPT = "The capital of France is"


def _step(title: str) -> float:
    say(f"\n== {title}")
    return time.perf_counter()


def _done(t0: float) -> None:
    say(f"   ({time.perf_counter() - t0:.1f} s)")


def _quant_args(args: argparse.Namespace, mode: str) -> argparse.Namespace:
    return argparse.Namespace(
        model=SMOLLM2, bits=4, group_size=64, order="act", clip="true", target_bits=None,
        outlier_density=None, mode=mode, calib_file=args.calib_file,
        calib_windows=args.calib_windows, calib_len=args.calib_len, seed=args.seed)


def compiled_generation(model: torch.nn.Module, tokenizer: Any, new_tokens: int
                        ) -> tuple[str, bool]:
    """Greedy tokens from the ``torch.compile``-d static-cache step; equal to eager's?"""
    from babai_ao.export.generate import greedy
    from babai_ao.export.llm import static_cache_module

    prompt = tokenizer(PROMPT).input_ids
    cache = len(prompt) + new_tokens

    def stepper(module: torch.nn.Module):
        def step(tok: int, pos: int) -> torch.Tensor:
            with torch.no_grad():
                return module(input_ids=torch.tensor([[tok]]),
                              cache_position=torch.tensor([pos]))[0, -1]
        return step

    tokens = greedy(stepper(torch.compile(static_cache_module(model, cache))), prompt,
                    new_tokens, cache)
    eager = greedy(stepper(static_cache_module(model, cache)), prompt, new_tokens, cache)
    return tokenizer.decode(tokens), tokens == eager


def run(args: argparse.Namespace) -> int:
    from .runs import write_json

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise BabaiError(f"{out} already exists: choose another --out or pass --overwrite")
    progress = not args.no_progress
    start = time.perf_counter()
    eval_desc = f"{'all' if args.windows is None else args.windows} windows x {args.seq_len} tokens"

    t0 = _step("load SmolLM2-135M-Instruct (float32)")
    model, tokenizer, depth = load_measured(SMOLLM2, args.num_layers)
    if depth.cut:
        say(f"   {depth.note()}: perplexities below are not the full model's")
    _done(t0)

    ppl: dict[str, float] = {}
    t0 = _step(f"float perplexity ({eval_desc})")
    ppl["float"] = evaluate(model, tokenizer, args.windows, args.seq_len, progress=progress)
    _done(t0)

    records: dict[str, dict[str, Any]] = {}
    models = {}
    for name, mode in (("rtn-w4g64", "rtn"), ("babai-w4g64-act-seq", "sequential")):
        t0 = _step(f"{name}: quantize" + ("" if mode == "rtn" else
                   f" (calibration {args.calib_windows} x {args.calib_len} tokens)"))
        qmodel = copy.deepcopy(model)
        qargs = _quant_args(args, mode)
        rec = quantize_loaded(qmodel, tokenizer, qargs, make_config(qargs), progress)
        rec.update(depth.fields())
        summary(rec)
        rec["ppl"] = ppl[name] = evaluate(qmodel, tokenizer, args.windows, args.seq_len,
                                              progress=progress)
        rec.update(windows=args.windows, seq_len=args.seq_len, label=name)
        records[name], models[name] = rec, qmodel
        _done(t0)
    babai = models["babai-w4g64-act-seq"]

    t0 = _step(f"torch.compile: greedy generation of {args.new_tokens} tokens (Babai model)")
    text, same = compiled_generation(babai, tokenizer, args.new_tokens)
    say(f"   {PROMPT!r} -> {text!r}  (compiled tokens == eager tokens: {same})")
    _done(t0)

    with atomic_directory(out, args.overwrite) as tmp:
        exports = []
        if args.export_layers:
            part = copy.deepcopy(babai)
            keep_first_blocks(part, args.export_layers)
            example = export_example(tokenizer, 16)
            for fmt in ("pte", "onnx"):
                t0 = _step(f"export the first {args.export_layers} blocks to .{fmt}, run once")
                rep = export_model(part, fmt, EXPORT_MODES[fmt][0],
                                       tmp / f"babai-w4g64-{args.export_layers}blocks.{fmt}",
                                       example)
                say(f"   {rep.summary().replace(str(tmp), str(out))}")
                exports.append({"format": fmt, "mode": rep.mode, "bytes": rep.size_bytes,
                                "max_abs_diff": rep.max_abs_diff})
                _done(t0)
        t0 = _step("report")
        for name, rec in records.items():
            rec["exports"] = exports if name.startswith("babai") else []
            (tmp / name).mkdir()
            write_json(tmp / name / "babai_run.json", {k: v for k, v in rec.items()
                                                       if k != "label"})
        written = write_report(list(records.values()), tmp, ppl["float"])
        say("   " + ", ".join(str(out / p.name) for p in written))
        _done(t0)

    cut = f"; {depth.note()}" if depth.cut else ""
    say(f"\nperplexity, WikiText-2 test ({eval_desc}; not protocol P1{cut}):")
    for name, value in ppl.items():
        bits = records[name]["avg_bits_per_weight"] if name in records else 32.0
        say(f"   {name:<22} {value:8.3f}   {bits:.3f} bits/weight")
    say(f"demo done in {time.perf_counter() - start:.0f} s; output in {out}")
    return 0
