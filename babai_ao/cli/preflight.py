"""Checks of a command's arguments, against each other and against the model, before any work.

Everything here reads the arguments, file headers and the model's config (never its
weights), so a bad request fails in a second with one line, ``babai-ao: error: <problem>:
<fix>``, before a model is loaded, a calibration runs or an output directory exists:

* numbers in range (windows, lengths, token counts, threads, blocks to keep);
* sequence lengths against the model's context, ``--num-layers`` against its depth;
* ``--group-size`` against every decoder linear's ``in_features`` (from the config);
* combinations: ``--stream`` / ``--save-state`` / ``--spill-dir`` (calibrated modes, float
  sources, an existing spill directory), the
  no-clipping formats' rate arguments, ``--clip false`` (the packed
  format cannot hold codes outside the b-bit range), export modes and file suffixes,
  ``--nproc`` (a calibration mode, at least one calibration batch per process);
* files by their content: a ``.gguf`` by its magic bytes (``sources.resolve``), text
  files (calibration / test data) as UTF-8.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from babai_ao.errors import BabaiError

from .sources import SMOLLM2, model_config, resolve

TEXT_PROBE_BYTES = 4096


def check(args: argparse.Namespace) -> None:
    """Raise ``BabaiError`` for the first argument problem of ``args.command``."""
    _positive(args, "threads")
    handler = {"quantize": _quantize, "eval": _eval, "export": _export, "demo": _demo,
               "report": _report}[args.command]
    handler(args)


# ---- per command ---------------------------------------------------------------------------
def _quantize(args: argparse.Namespace) -> None:
    _out_is_free(args)
    _positive(args, "calib_windows", "calib_len")
    _processes(args)
    _at_least(args, "refine", minimum=0)
    _at_least(args, "tune", minimum=0)
    if getattr(args, "tune", 0) and args.mode == "rtn":
        raise BabaiError("--tune needs calibration data: use --mode sequential or observe "
                         "(or drop --tune)")
    lr = getattr(args, "tune_lr", None)
    if lr is not None and not getattr(args, "tune", 0):
        raise BabaiError(f"--tune-lr {lr} has nothing to set without --tune STEPS: add --tune "
                         "or drop --tune-lr")
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise BabaiError(f"--tune-lr must be a positive finite learning rate, got {lr}")
    if getattr(args, "hessian_tiles", None) is not None and args.mode == "rtn":
        raise BabaiError("--hessian-tiles / --no-hessian-tiles apply to calibration (--mode "
                         "sequential or observe): --mode rtn forms no Hessian; drop the flag")
    _allocation(args)
    _at_least(args, "k", minimum=1)
    _text_file(args.calib_file, "--calib-file")
    _rate_arguments(args)
    _streaming(args)
    shape = _model_shape(args.model, args.num_layers)
    _fits_context(args, shape, "calib_len", "--calib-len")
    _group_divides(args.group_size, shape)


def _eval(args: argparse.Namespace) -> None:
    _positive(args, "seq_len", "new_tokens")
    _text_file(args.data_file, "--data-file")
    if args.generate is not None and not args.generate.strip():
        raise BabaiError("--generate needs a prompt: give some text, e.g. --generate 'The "
                         "capital of France is'")
    _fits_context(args, _model_shape(args.model, args.num_layers), "seq_len", "--seq-len")


def _export(args: argparse.Namespace) -> None:
    from .export import EXPORT_MODES

    modes = EXPORT_MODES[args.format]
    if args.mode is not None and args.mode not in modes:
        raise BabaiError(f"--mode {args.mode} is not a {args.format} mode: choose one of "
                         f"{', '.join(modes)}")
    if args.format == "compressed-tensors":
        _compressed_tensors_export(args)
    elif args.out is not None and Path(args.out).suffix != f".{args.format}":
        raise BabaiError(f"--out {args.out} does not end in .{args.format}: name the file "
                         f"*.{args.format} (--format {args.format} writes that format)")
    _positive(args, "seq_len", "embedding_group_size")
    shape = _model_shape(args.model, args.num_layers)
    _fits_context(args, shape, "seq_len", "--seq-len")
    if args.quantize_embedding != "none" and shape.hidden % args.embedding_group_size:
        raise BabaiError(f"--embedding-group-size {args.embedding_group_size} does not divide "
                         f"the embedding dimension {shape.hidden}: choose one of "
                         f"{_divisor_hint(shape.hidden)}")
    if (args.mode or modes[0]) == "8da4w" and shape.run_bits not in (None, 4):
        raise BabaiError(f"--mode 8da4w takes 4-bit layers; {args.model} holds "
                         f"{shape.run_bits}-bit layers: export it with --mode weight_only")
    if args.format == "gguf" and resolve(args.model).kind == "run":
        from .runs import load_run

        run = load_run(resolve(args.model).directory)
        if run.get("bits") not in (4, 8) or run.get("group_size") != 32:
            raise BabaiError(f"{args.model} holds {run.get('bits')}-bit codes in groups of "
                             f"{run.get('group_size')}; GGUF blocks hold 4- or 8-bit codes in "
                             "groups of 32: quantize with --bits 4 --group-size 32")


def _demo(args: argparse.Namespace) -> None:
    _out_is_free(args)
    _positive(args, "calib_windows", "calib_len", "seq_len", "new_tokens")
    _at_least(args, "export_layers", minimum=0)
    _text_file(args.calib_file, "--calib-file")
    shape = _model_shape(SMOLLM2, args.num_layers)
    _fits_context(args, shape, "calib_len", "--calib-len")
    _fits_context(args, shape, "seq_len", "--seq-len")
    kept = min(shape.layers, args.num_layers or shape.layers)
    if args.export_layers > kept:
        raise BabaiError(f"--export-layers {args.export_layers} exceeds the {kept} decoder "
                         f"blocks the demo keeps: give at most {kept} (0 skips export)")


def _report(args: argparse.Namespace) -> None:
    if args.float_ppl is not None and not (math.isfinite(args.float_ppl) and args.float_ppl > 0):
        raise BabaiError(f"--float-ppl {args.float_ppl} must be a positive perplexity (the "
                         "float model's, to draw as a line)")


def _compressed_tensors_export(args: argparse.Namespace) -> None:
    """A directory from ``quantize`` with 4- or 8-bit clipped codes, into a new directory."""
    from babai_ao.checkpoints.compressed_tensors import WORKS

    where = resolve(args.model)
    if where.kind != "run":
        raise BabaiError(f"--format compressed-tensors writes babai-ao quantized weights; "
                         f"{args.model} is not a `babai-ao quantize` directory: quantize it first")
    from .runs import load_run

    record = load_run(where.directory)
    if record.get("clip") in ("ssqr", "hptq") or record.get("bits") not in (4, 8):
        raise BabaiError(f"{args.model} holds {record.get('bits')}-bit clip={record.get('clip')} "
                         f"layers, which compressed-tensors cannot hold: export {WORKS}")
    if args.quantize_embedding != "none":
        raise BabaiError("--quantize-embedding: compressed-tensors (as vLLM loads it) quantizes "
                         "linears only: leave it out")
    out = Path(args.out) if args.out is not None else where.directory / "compressed-tensors"
    if out.suffix in (".pte", ".onnx", ".gguf", ".safetensors", ".json"):
        raise BabaiError(f"--out {out} names a file; --format compressed-tensors writes a "
                         "directory: give a directory name")
    if out.exists():
        raise BabaiError(f"{out} already exists: choose another --out")


def _streaming(args: argparse.Namespace) -> None:
    """``--stream`` / ``--save-state``: a float source, a calibrated mode, a usable state dir."""
    spill = getattr(args, "spill_dir", None)
    if not (getattr(args, "stream", False) or getattr(args, "save_state", None)):
        if spill:
            raise BabaiError("--spill-dir is for streamed runs: add --stream (or drop it)")
        return
    if spill and not Path(spill).is_dir():
        raise BabaiError(f"--spill-dir {spill} is not an existing directory: create it or give "
                         "another one")
    flag = "--save-state" if args.save_state else "--stream"
    if args.mode == "rtn":
        raise BabaiError(f"{flag} streams calibrated runs: use --mode sequential or observe "
                         "(rtn needs no calibration; run it without --stream)")
    if resolve(args.model).kind == "run":
        raise BabaiError(f"{flag} reads float weights; {args.model} is already quantized: "
                         "give the float model (smollm2, a .gguf file or a transformers dir)")
    if args.save_state:
        state = Path(args.save_state)
        if state.exists() and not state.is_dir():
            raise BabaiError(f"--save-state {state} is a file: give a directory")
        if state.resolve() == Path(args.out).resolve():
            raise BabaiError("--save-state must differ from --out: give another directory")


# ---- shared checks -------------------------------------------------------------------------
class ModelShape:
    """What the checks need from a model's config (and a run record, if MODEL is a run)."""

    def __init__(self, config: Any, run_bits: int | None) -> None:
        text = getattr(config, "get_text_config", lambda: config)()
        self.layers = int(text.num_hidden_layers)
        self.hidden = int(text.hidden_size)
        heads = int(text.num_attention_heads)
        head_dim = int(getattr(text, "head_dim", None) or self.hidden // heads)
        intermediate = int(getattr(text, "intermediate_size", None) or 4 * self.hidden)
        # in_features of the decoder linears: q/k/v and gate/up read the hidden state, o_proj
        # the attention heads, down_proj the MLP's inner activation
        self.in_features = {"q/k/v/gate/up (hidden size)": self.hidden,
                            "o_proj (heads × head_dim)": heads * head_dim,
                            "down_proj (intermediate size)": intermediate}
        expert = getattr(text, "moe_intermediate_size", None)
        if expert:  # fused MoE experts: their down_proj reads the expert's inner activation
            self.in_features["experts' down_proj (moe_intermediate_size)"] = int(expert)
        self.context = getattr(text, "max_position_embeddings", None)
        self.run_bits = run_bits


def _model_shape(source: str, num_layers: int | None) -> ModelShape:
    """The model's shape from its config; ``--num-layers`` checked against its depth."""
    where = resolve(source)
    run_bits = None
    if where.kind == "run":
        from .runs import load_run

        run_bits = load_run(where.directory).get("bits")
    shape = ModelShape(model_config(source), run_bits)
    if num_layers is not None and not 1 <= num_layers <= shape.layers:
        raise BabaiError(f"--num-layers {num_layers} is outside the model's 1..{shape.layers} "
                         "decoder blocks: give a number in that range (or leave it out for all)")
    return shape


def _fits_context(args: argparse.Namespace, shape: ModelShape, name: str, flag: str) -> None:
    value = getattr(args, name)
    if shape.context is not None and value > shape.context:
        raise BabaiError(f"{flag} {value} exceeds the model's context of {shape.context} "
                         f"tokens: give at most {shape.context}")


def _group_divides(group_size: int | None, shape: ModelShape) -> None:
    if group_size is None:
        return
    for what, k in shape.in_features.items():
        if k % group_size:
            common = math.gcd(*shape.in_features.values())
            raise BabaiError(f"--group-size {group_size} does not divide in_features {k} of "
                             f"the model's {what}: choose one of {_divisor_hint(common)} "
                             "(or `none` for one group per row)")


def _divisor_hint(n: int) -> str:
    divisors = [d for d in range(16, n + 1) if n % d == 0][:4] or [1]
    return ", ".join(map(str, divisors))


def _rate_arguments(args: argparse.Namespace) -> None:
    """Clip × rate arguments; ``BabaiConfig`` checks the rest when ``make_config`` runs."""
    if args.clip == "false":
        raise BabaiError(f"--clip false leaves codes outside the {args.bits}-bit range, which "
                         "the packed format cannot store: use --clip ssqr or --clip hptq "
                         "(no clipping, stored exactly) or --clip true (GPTQ's clamping)")
    if args.outlier_density is not None and not 0 < args.outlier_density < 1:
        raise BabaiError(f"--outlier-density {args.outlier_density} must be a fraction "
                         "between 0 and 1 (e.g. 0.01)")
    target = args.target_bits
    if target is None:
        return
    if not math.isfinite(target) or target <= 0:
        raise BabaiError(f"--target-bits {target} must be a positive number of bits per weight "
                         "(e.g. 3.3)")
    if args.clip == "ssqr" and args.group_size is not None:
        dense = args.bits + (16 + args.bits) / args.group_size  # codes + fp16 scale + zero
        if target <= dense:
            raise BabaiError(f"--target-bits {target} is not above the dense cost of "
                             f"{args.bits}-bit codes with group {args.group_size} "
                             f"({dense:.3f} bits/weight), which SSQR adds outliers to: give "
                             f"more, e.g. {dense + 0.2:.1f}")
    if args.clip == "hptq" and not 1 <= target <= 8:
        raise BabaiError(f"--target-bits {target} is outside HPTQ's 1..8 bits per weight: "
                         "give e.g. 3.3")


def _allocation(args: argparse.Namespace) -> None:
    """``--allocate``: an HPTQ budget, calibrated, the whole model in one process. Unset, it
    is on exactly where it can run (``--clip hptq --target-bits``, a calibration mode, one
    process, not streamed); where only the process or streaming rules it out, one line on
    stderr says so."""
    if getattr(args, "allocate", False) is None:
        hptq_budget = args.clip == "hptq" and args.target_bits is not None
        blocker = ("--stream/--save-state" if getattr(args, "stream", False)
                   or getattr(args, "save_state", None) else
                   "--nproc" if getattr(args, "nproc", 1) > 1 else None)
        args.allocate = hptq_budget and args.mode != "rtn" and blocker is None
        if hptq_budget and args.mode != "rtn" and blocker is not None:
            print(f"note: one-λ bit allocation (the --clip hptq default) is off with "
                  f"{blocker}: each layer runs its own rate search", file=sys.stderr)
    if not args.allocate:
        return
    _positive(args, "fisher_windows")
    if args.clip != "hptq" or args.target_bits is None:
        raise BabaiError("--allocate spreads an HPTQ budget over the layers: add --clip hptq "
                         "--target-bits B (e.g. 3.3)")
    if args.mode == "rtn":
        raise BabaiError("--allocate needs calibration data (Fisher sensitivities, Hessians): "
                         "use --mode sequential or observe")
    if getattr(args, "stream", False) or getattr(args, "save_state", None):
        raise BabaiError("--allocate measures every layer of the float model first, which a "
                         "streamed run never holds: drop --stream/--save-state or --allocate")
    if getattr(args, "nproc", 1) > 1:
        raise BabaiError("--allocate runs in one process (its float-model pass is not split "
                         "across ranks): drop --nproc or --allocate")


def _processes(args: argparse.Namespace) -> None:
    """``--nproc``: calibration modes only, at least one calibration batch per process."""
    from .quantize import CALIB_BATCH

    _positive(args, "nproc")
    timeout = getattr(args, "dist_timeout", None)
    if timeout is not None and not timeout > 0:
        raise BabaiError(f"--dist-timeout {timeout} must be a positive number of seconds")
    n = getattr(args, "nproc", 1)
    if n <= 1:
        return
    if args.mode == "rtn":
        raise BabaiError("--nproc splits calibration, and --mode rtn has none: drop --nproc "
                         "or use --mode sequential / observe")
    batches = math.ceil(args.calib_windows / CALIB_BATCH)
    if batches < n:
        raise BabaiError(f"--nproc {n} needs at least {n} calibration batches of {CALIB_BATCH} "
                         f"windows, and --calib-windows {args.calib_windows} makes {batches}: "
                         f"pass --calib-windows {CALIB_BATCH * n} or more, or fewer processes")


def _positive(args: argparse.Namespace, *names: str) -> None:
    _at_least(args, *names, minimum=1)


def _at_least(args: argparse.Namespace, *names: str, minimum: int) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < minimum:
            flag = "--" + name.replace("_", "-")
            raise BabaiError(f"{flag} {value} must be at least {minimum}")


def _text_file(path: str | None, flag: str) -> None:
    if path is None:
        return
    p = Path(path)
    if not p.is_file():
        raise BabaiError(f"{flag} {path} is not a file: give the path of a text file")
    with p.open("rb") as f:
        head = f.read(TEXT_PROBE_BYTES)
    if not head:
        raise BabaiError(f"{flag} {path} is empty: give a text file with some text in it")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not just a character cut at the probe's end
            raise BabaiError(f"{flag} {path} is not UTF-8 text (byte {e.start} is "
                             f"{head[e.start:e.start + 1]!r}): give a plain-text file") from None


def _out_is_free(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise BabaiError(f"{out} already exists: choose another --out or pass --overwrite")
