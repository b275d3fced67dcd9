"""``babai-ao quantize``: calibrate, quantize, save (safetensors + tokenizer + run record).

With ``--nproc N`` the command starts itself again under ``torchrun`` (``launch``); each of
the ``N`` processes loads the model and calibrates its share of the windows
(``babai_ao.calibration.distributed``), and once all of them are done, rank 0 alone writes
the output directory (atomically: a failed run leaves none).
"""

from __future__ import annotations

import argparse
import contextlib
import time
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from babai_ao import __version__
from babai_ao.calibration import distributed
from babai_ao.errors import BabaiError

from .depth import Depth, load_measured
from .output import atomic_directory, say

CALIB_BATCH = 8  # calibration windows per forward batch (quantize_model's batch_size)


def make_config(args: argparse.Namespace) -> Any:
    """``babai_config`` from the grid arguments (it validates them)."""
    from babai_ao import babai_config

    clip: bool | str = {"true": True, "false": False}.get(args.clip, args.clip)
    extra = {k: v for k, v in (("target_bits", args.target_bits),
                               ("outlier_density", args.outlier_density)) if v is not None}
    return babai_config(bits=args.bits, group_size=args.group_size, order=args.order,
                        clip=clip, refine=getattr(args, "refine", 0),
                        symmetric=getattr(args, "symmetric", False),
                        exact_offset=getattr(args, "exact_offset", False),
                        search=getattr(args, "search", "babai"), k=getattr(args, "k", 16),
                        **extra)


def quantize_loaded(model: nn.Module, tokenizer: Any, args: argparse.Namespace, config: Any,
                    progress: bool = True, stream: Any = None) -> dict[str, Any]:
    """Quantize ``model`` in place with ``config`` (``make_config(args)``) and the
    calibration/mode in ``args``; returns the run record (no perplexity yet). ``stream``: a
    ``BlockStream`` for a meta-device model (``stream.quantize_streamed``)."""
    from . import runs

    record: dict[str, Any] = {
        "babai_ao": __version__, "method": "rtn" if args.mode == "rtn" else "babai",
        "model": args.model, "bits": args.bits, "group_size": args.group_size,
        "order": args.order, "clip": args.clip, "mode": args.mode,
        "target_bits": args.target_bits, "outlier_density": args.outlier_density,
        "refine": getattr(args, "refine", 0), "symmetric": getattr(args, "symmetric", False),
        "exact_offset": getattr(args, "exact_offset", False),
        "search": getattr(args, "search", "babai"), "k": getattr(args, "k", 16)}
    t0 = time.perf_counter()
    if args.mode == "rtn":
        from torchao.quantization import quantize_

        linears = {id(m) for _, m in runs.decoder_linears(model) if isinstance(m, nn.Linear)}
        with warnings.catch_warnings():  # RTN was asked for: no "no Hessian" warning
            warnings.filterwarnings("ignore", message="babai_config without calibration")
            quantize_(model, config, filter_fn=lambda m, _fqn: id(m) in linears)
        record["layers"] = runs.certificate_rows(model)
    else:
        from babai_ao.calibration.data import calibration_windows
        from babai_ao.calibration.sequential import quantize_model

        calib = calibration_windows(tokenizer, args.calib_file, n=args.calib_windows,
                                    seq_len=args.calib_len, seed=args.seed)
        record["calibration"] = {"file": args.calib_file or "wiki.valid.tokens (default)",
                                 "windows": args.calib_windows, "seq_len": args.calib_len,
                                 "seed": args.seed}
        from babai_ao.calibration.tuning import TuneSettings

        steps = getattr(args, "tune", 0)
        tune = None
        if steps:
            lr = getattr(args, "tune_lr", None)
            tune = TuneSettings(steps=steps) if lr is None else TuneSettings(steps=steps, lr=lr)
            record["tune_lr"] = tune.lr
        tiles = getattr(args, "hessian_tiles", None) is not False  # on unless refused
        record["tune_steps"] = steps
        record["hessian_tiles"] = tiles
        options = {"mode": args.mode, "progress": progress, "batch_size": CALIB_BATCH,
                   "stream": stream, "tune": tune, "hessian_tiles": tiles}
        if getattr(args, "allocate", False):  # one λ: each layer's own target bits first
            from babai_ao.calibration.allocation import quantize_model_allocated

            report, bits = quantize_model_allocated(model, config, calib,
                                                    fisher_windows=args.fisher_windows,
                                                    **options)
            record["allocation"] = bits.summary()
        else:
            report = quantize_model(model, config, calib, **options)
        record["layers"] = runs.report_rows(report)
    record["quant_seconds"] = time.perf_counter() - t0
    record.update(runs.coverage_fields(model, record["layers"]))
    record["avg_bits_per_weight"] = runs.stored_bits_per_weight(model)
    return record


def save_run(model: nn.Module, tokenizer: Any, config: Any, record: dict[str, Any],
             directory: Path) -> None:
    """Model (safetensors), tokenizer and run record into ``directory``."""
    from babai_ao.checkpoints.hf import save_pretrained

    from .runs import RUN_FILE, write_json

    save_pretrained(model, directory, config)
    tokenizer.save_pretrained(directory)
    write_json(directory / RUN_FILE, record)


def cmd_quantize(args: argparse.Namespace) -> int:
    if getattr(args, "nproc", 1) > 1 and not distributed.launched():
        from .launch import torchrun

        return torchrun(args.nproc, args.argv)
    out = Path(args.out)
    if out.exists() and not args.overwrite:  # before any work
        raise BabaiError(f"{out} already exists: choose another --out or pass --overwrite")
    config = make_config(args)
    if getattr(args, "stream", False) or getattr(args, "save_state", None):
        from .stream import quantize_streamed

        record = quantize_streamed(args, config)
        summary(record)
        say(f"saved to {out} (next: `babai-ao eval {out}`)")
        return 0
    group = (distributed.process_group("cpu", getattr(args, "dist_timeout", 1800.0))
             if distributed.launched() else contextlib.nullcontext())
    with group:  # one of several processes (torchrun): calibrate together
        model, tokenizer, depth = load_measured(args.model, args.num_layers)
        quantize_and_save(model, tokenizer, args, config, depth, out)
    return 0


def quantize_and_save(model: nn.Module, tokenizer: Any, args: argparse.Namespace, config: Any,
                      depth: Depth, out: Path) -> None:
    """Quantize ``model`` (every rank of a distributed run, together) and, once all ranks
    have finished, save it to ``out`` from the lead rank only."""
    record = quantize_loaded(model, tokenizer, args, config, progress=not args.no_progress)
    record.update(depth.fields())
    record["processes"] = distributed.world_size()
    distributed.barrier("the end of calibration")  # nothing is written unless all succeeded
    if not distributed.is_lead():
        return
    with atomic_directory(out, args.overwrite) as tmp:
        save_run(model, tokenizer, config, record, tmp)
    summary(record)
    say(f"saved to {out} (next: `babai-ao eval {out}`)")


def summary(record: dict[str, Any]) -> None:
    """One line: method (and the cut, if any), layers, time, stored bits, what the
    certificates say (``runs.bound_summary``), and what stayed float."""
    from babai_ao.calibration.report import share_line

    from .runs import bound_summary

    rows = record.get("layers", [])
    bits = record.get("avg_bits_per_weight")
    note = Depth.of_record(record).note()
    say(f"{record['method']}{f' ({note})' if note else ''}: {len(rows)} linears quantized in "
        f"{record.get('quant_seconds', 0):.1f} s, "
        f"{'n/a' if bits is None else f'{bits:.3f}'} stored bits/weight, "
        f"{bound_summary(rows)}"
        + (f"; {share_line(record['quantized_parameters'], record['float_parameters'])}"
           if "float_parameters" in record else ""))
