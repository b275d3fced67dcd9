"""``babai-ao eval``: WikiText-2 perplexity (added to a run's record) and a greedy sample."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .depth import Depth, load_measured
from .output import say


def evaluate(model: nn.Module, tokenizer: Any, windows: int | None, seq_len: int,
             data_file: str | None = None, progress: bool = True, cpu_kernel: str = "exact"
             ) -> float:
    """Perplexity on the WikiText-2 test split (or ``data_file``); ``cpu_kernel``: ``"exact"``
    (the model's own numbers, as P1) or ``"auto"`` (``babai_ao.calibration.evaluate``)."""
    from babai_ao.calibration.data import test_tokens
    from babai_ao.calibration.evaluate import perplexity

    return perplexity(model, test_tokens(tokenizer, data_file), windows, seq_len, progress,
                      cpu_kernel)


def generate_text(model: nn.Module, tokenizer: Any, prompt: str, new_tokens: int) -> str:
    """Greedy continuation of ``prompt`` (eager ``model.generate``)."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _saved_run(source: str) -> dict[str, Any] | None:
    """The run record of a directory written by ``babai-ao quantize`` (``None``: not one)."""
    from .runs import RUN_FILE, load_run

    run_dir = Path(source)
    if run_dir.is_dir() and (run_dir / RUN_FILE).is_file():
        return load_run(run_dir)
    return None


def cmd_eval(args: argparse.Namespace) -> int:
    from .runs import RUN_FILE, write_json

    record = _saved_run(args.model)
    model, tokenizer, depth = load_measured(args.model, args.num_layers)
    if record is not None:  # a saved cut run: the model's depth is in its record
        depth = depth.inside(Depth.of_record(record))
    ppl = evaluate(model, tokenizer, args.windows, args.seq_len, args.data_file,
                   not args.no_progress, args.cpu_kernel)
    shown = "all" if args.windows is None else args.windows
    note = f"; {depth.note()}, not the full model" if depth.cut else ""
    say(f"perplexity {ppl:.3f} (WikiText-2 test, {shown} windows x {args.seq_len} tokens"
        f"{note}; CPU kernel {args.cpu_kernel})")
    if record is not None:
        record.update(ppl=ppl, windows=args.windows, seq_len=args.seq_len,
                      ppl_num_layers=depth.kept, ppl_cpu_kernel=args.cpu_kernel)
        record.pop("label", None)
        write_json(Path(args.model) / RUN_FILE, record)
    if args.generate:
        say(f"{args.generate!r} -> {generate_text(model, tokenizer, args.generate, args.new_tokens)!r}")
    return 0
