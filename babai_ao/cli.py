"""``babai-ao``: the command line (quantize, eval, export, report, demo).

A thin adapter: every step is a public library call (``quantize_model``, ``quantize_``
with ``babai_config``, ``perplexity``, ``babai_ao.export``, ``babai_ao.runs``/``plots``).
Errors a user can fix (``BabaiError``, missing files, bad arguments) print one line,
``babai-ao: error: <problem>: <fix>``, and exit with status 2; Ctrl-C exits with 130 and
leaves no half-written output directory (outputs are built in a temporary sibling
directory and renamed into place at the end).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from . import __version__
from .errors import BabaiError

BITS = (2, 3, 4, 8)
ORDERS = ("natural", "act", "min-pivot")
CLIPS = ("true", "false", "ssqr", "hptq")
QUANT_MODES = ("sequential", "observe", "rtn")
EXPORT_MODES = {"pte": ("weight_only", "8da4w"), "onnx": ("qdq", "matmulnbits")}
SMOLLM2 = "smollm2"
EXIT_USAGE = 2
EXIT_INTERRUPT = 130


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one line (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"babai-ao: error: {message} (see `{self.prog} --help`)\n")


def _say(msg: str) -> None:
    print(msg, flush=True)


# ---- models and checkpoints ------------------------------------------------------------
def _keep_first_blocks(model: nn.Module, num_layers: int | None) -> None:
    from .calibrate import decoder_blocks

    if num_layers is None:
        return
    if num_layers <= 0:
        raise BabaiError(f"--num-layers {num_layers} must be positive (or left out for all)")
    path, blocks = decoder_blocks(model)
    parent = model.get_submodule(path.rsplit(".", 1)[0])
    setattr(parent, path.rsplit(".", 1)[1], blocks[:num_layers])
    model.config.num_hidden_layers = min(num_layers, len(blocks))
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:num_layers]


def load_model(source: str, num_layers: int | None = None) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from ``smollm2``, a ``.gguf`` file, a transformers checkpoint
    directory, or a directory written by ``babai-ao quantize`` (loaded quantized)."""
    from .models import load_smollm2
    from .runs import RUN_FILE

    if source.lower() == SMOLLM2:
        return load_smollm2(num_layers=num_layers)
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise BabaiError(f"GGUF file {path} does not exist: give the path of a .gguf file "
                             f"or `{SMOLLM2}` for the bundled model")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    elif path.is_dir() and (path / "config.json").is_file():
        from transformers import AutoTokenizer

        if (path / RUN_FILE).is_file():
            from .hf import from_pretrained
            from .hptq_tensor import decode_model

            model = from_pretrained(path, dtype=torch.float32)
            decode_model(model)  # HPTQ: Huffman stream -> 8-bit compute form, once
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        raise BabaiError(f"model {source!r} is neither `{SMOLLM2}`, a .gguf file, nor a "
                         "directory with config.json: pass one of those")
    _keep_first_blocks(model, num_layers)
    return model.eval(), tokenizer


@contextlib.contextmanager
def atomic_directory(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling of ``out`` that becomes ``out`` only if the block completes."""
    if out.exists() and not overwrite:
        raise BabaiError(f"{out} already exists: choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- quantization ----------------------------------------------------------------------
def make_config(args: argparse.Namespace) -> Any:
    """``babai_config`` from the grid arguments (it validates them)."""
    from . import babai_config

    clip: bool | str = {"true": True, "false": False}.get(args.clip, args.clip)
    extra = {k: v for k, v in (("target_bits", args.target_bits),
                               ("outlier_density", args.outlier_density)) if v is not None}
    return babai_config(bits=args.bits, group_size=args.group_size, order=args.order,
                        clip=clip, refine=getattr(args, "refine", 0), **extra)


def quantize_loaded(model: nn.Module, tokenizer: Any, args: argparse.Namespace, config: Any,
                    progress: bool = True) -> dict[str, Any]:
    """Quantize ``model`` in place with ``config`` (``make_config(args)``) and the
    calibration/mode in ``args``; returns the run record (no perplexity yet)."""
    from . import runs

    record: dict[str, Any] = {
        "babai_ao": __version__, "method": "rtn" if args.mode == "rtn" else "babai",
        "model": args.model, "bits": args.bits, "group_size": args.group_size,
        "order": args.order, "clip": args.clip, "mode": args.mode,
        "target_bits": args.target_bits, "outlier_density": args.outlier_density,
        "refine": getattr(args, "refine", 0)}
    t0 = time.perf_counter()
    if args.mode == "rtn":
        from torchao.quantization import quantize_

        linears = {id(m) for _, m in runs.decoder_linears(model)}
        with warnings.catch_warnings():  # RTN was asked for: no "no Hessian" warning
            warnings.filterwarnings("ignore", message="babai_config without calibration")
            quantize_(model, config, filter_fn=lambda m, _fqn: id(m) in linears)
        record["layers"] = runs.certificate_rows(model)
    else:
        from .calibrate import quantize_model
        from .data import calibration_windows

        # TODO(lead): drop once quantize_model applies the formats via config.quantize_tensor
        if args.clip in ("ssqr", "hptq"):
            raise BabaiError(f"--clip {args.clip} with --mode {args.mode} is not wired into "
                             "sequential calibration yet: use --mode rtn for this format")

        calib = calibration_windows(tokenizer, args.calib_file, n=args.calib_windows,
                                    seq_len=args.calib_len, seed=args.seed)
        record["calibration"] = {"file": args.calib_file or "wiki.valid.tokens (default)",
                                 "windows": args.calib_windows, "seq_len": args.calib_len,
                                 "seed": args.seed}
        report = quantize_model(model, config, calib, mode=args.mode, progress=progress)
        record["layers"] = runs.report_rows(report)
    record["quant_seconds"] = time.perf_counter() - t0
    record["avg_bits_per_weight"] = runs.stored_bits_per_weight(model)
    return record


def save_run(model: nn.Module, tokenizer: Any, config: Any, record: dict[str, Any],
             directory: Path) -> None:
    """Model (safetensors), tokenizer and run record into ``directory``."""
    from .hf import save_pretrained
    from .runs import RUN_FILE, write_json

    save_pretrained(model, directory, config)
    tokenizer.save_pretrained(directory)
    write_json(directory / RUN_FILE, record)


def cmd_quantize(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not args.overwrite:  # before any work
        raise BabaiError(f"{out} already exists: choose another --out or pass --overwrite")
    config = make_config(args)
    model, tokenizer = load_model(args.model, args.num_layers)
    record = quantize_loaded(model, tokenizer, args, config, progress=not args.no_progress)
    record["num_layers"] = args.num_layers
    with atomic_directory(out, args.overwrite) as tmp:
        save_run(model, tokenizer, config, record, tmp)
    _summary(record)
    _say(f"saved to {out} (next: `babai-ao eval {out}`)")
    return 0


def _summary(record: dict[str, Any]) -> None:
    rows = record.get("layers", [])
    applicable = [r for r in rows if r.get("clipped", 0) == 0]
    held = sum(bool(r.get("bound_holds")) for r in applicable)
    bits = record.get("avg_bits_per_weight")
    _say(f"{record['method']}: {len(rows)} linears quantized in "
         f"{record.get('quant_seconds', 0):.1f} s, "
         f"{'n/a' if bits is None else f'{bits:.3f}'} stored bits/weight, "
         f"E <= B on {held}/{len(applicable)} unclipped layers, "
         f"{sum(r.get('clipped', 0) for r in rows)} weights clipped")


# ---- evaluation ------------------------------------------------------------------------
def evaluate(model: nn.Module, tokenizer: Any, windows: int | None, seq_len: int,
             data_file: str | None = None, progress: bool = True) -> float:
    from .data import test_tokens
    from .evaluate import perplexity

    return perplexity(model, test_tokens(tokenizer, data_file), windows, seq_len, progress)


def generate_text(model: nn.Module, tokenizer: Any, prompt: str, new_tokens: int) -> str:
    """Greedy continuation of ``prompt`` (eager ``model.generate``)."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def cmd_eval(args: argparse.Namespace) -> int:
    from .runs import RUN_FILE, load_run, write_json

    model, tokenizer = load_model(args.model, args.num_layers)
    ppl = evaluate(model, tokenizer, args.windows, args.seq_len, args.data_file,
                   not args.no_progress)
    shown = "all" if args.windows is None else args.windows
    _say(f"perplexity {ppl:.3f} (WikiText-2 test, {shown} windows x {args.seq_len} tokens)")
    run_dir = Path(args.model)
    if run_dir.is_dir() and (run_dir / RUN_FILE).is_file():
        record = load_run(run_dir)
        record.update(ppl=ppl, windows=args.windows, seq_len=args.seq_len)
        record.pop("label", None)
        write_json(run_dir / RUN_FILE, record)
    if args.generate:
        _say(f"{args.generate!r} -> {generate_text(model, tokenizer, args.generate, args.new_tokens)!r}")
    return 0


# ---- export ----------------------------------------------------------------------------
class LogitsOnly(nn.Module):
    """``input_ids [B, T] -> logits [B, T, V]`` (no cache): an exportable causal LM forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def export_model(model: nn.Module, fmt: str, mode: str, path: Path, example: torch.Tensor):
    """Export, run the artifact once on ``example`` and return the ``ExportReport``."""
    from . import ops  # noqa: F401  (registers babai::linear, which the exporters look up)
    from .export import to_executorch, to_onnx

    wrapper = LogitsOnly(model).eval()
    if fmt == "pte":
        return to_executorch(wrapper, (example,), path, mode=mode)
    return to_onnx(wrapper, (example,), path, format=mode)


def _export_example(tokenizer: Any, seq_len: int) -> torch.Tensor:
    ids = tokenizer("The lattice of a linear layer", return_tensors="pt").input_ids[0]
    return ids.repeat(seq_len // ids.numel() + 1)[:seq_len].reshape(1, -1)


def cmd_export(args: argparse.Namespace) -> int:
    modes = EXPORT_MODES[args.format]
    mode = args.mode or modes[0]
    if mode not in modes:
        raise BabaiError(f"--mode {mode} is not a {args.format} mode: choose one of {modes}")
    model, tokenizer = load_model(args.model, args.num_layers)
    if args.quantize_embedding != "none":
        from .embedding import quantize_embeddings_

        quantize_embeddings_(model, bits=int(args.quantize_embedding),
                             group_size=args.embedding_group_size)
    default = Path(args.model) if Path(args.model).is_dir() else Path(".")
    path = Path(args.out) if args.out else default / f"model.{args.format}"
    rep = export_model(model, args.format, mode, path, _export_example(tokenizer, args.seq_len))
    _say(rep.summary())
    return 0


# ---- report ----------------------------------------------------------------------------
def write_report(records: Sequence[dict[str, Any]], out: Path,
                 float_ppl: float | None = None) -> list[Path]:
    """``report.md`` (one layer table per run) and the PNG plots, into ``out``."""
    from . import plots, runs

    written = []
    parts = ["# babai-ao report", ""]
    for rec in records:
        label = rec["label"]
        ppl = rec.get("ppl")
        bits = rec.get("avg_bits_per_weight")
        parts += [f"## {label}", "",
                  f"method {rec.get('method')}, bits {rec.get('bits')}, group "
                  f"{rec.get('group_size')}, order {rec.get('order')}, clip {rec.get('clip')}, "
                  f"mode {rec.get('mode')}; stored bits/weight "
                  f"{'n/a' if bits is None else f'{bits:.3f}'}; perplexity "
                  f"{'not evaluated' if ppl is None else f'{ppl:.3f}'}", ""]
        if rec.get("layers"):
            parts += [runs.layer_table(rec), ""]
            written.append(plots.error_vs_bound(rec, out / f"error_vs_bound_{label}.png"))
    if sum(r.get("ppl") is not None and r.get("avg_bits_per_weight") is not None
           for r in records) >= 2:
        written.append(plots.bits_vs_perplexity(records, out / "bits_vs_ppl.png", float_ppl))
    md = out / "report.md"
    md.write_text("\n".join(parts))
    return [md, *written]


def cmd_report(args: argparse.Namespace) -> int:
    from .runs import load_run

    records = [load_run(p) for p in args.runs]
    labels = [r["label"] for r in records]
    if len(set(labels)) != len(labels):
        raise BabaiError(f"runs share a name ({labels}): give runs with distinct directory "
                         "or file names")
    out = Path(args.out) if args.out else (Path(args.runs[0]) if Path(args.runs[0]).is_dir()
                                           else Path(args.runs[0]).parent) / "report"
    out.mkdir(parents=True, exist_ok=True)
    written = write_report(records, out, args.float_ppl)
    for rec in records:
        if rec.get("layers"):
            from .runs import layer_table

            _say(f"{rec['label']}:\n{layer_table(rec)}")
    _say("wrote " + ", ".join(str(p) for p in written))
    return 0


# ---- demo ------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.run(args)


# ---- parser ----------------------------------------------------------------------------
def _positive_or_none(flag: str, none_words: tuple[str, ...], example: str):
    """argparse type: a positive integer, or ``None`` for one of ``none_words``."""
    def parse(text: str) -> int | None:
        if text in none_words:
            return None
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r} is not a number: give {example} "
                                             f"or `{none_words[0]}`") from None
        if n <= 0:
            raise argparse.ArgumentTypeError(f"{flag} {n} must be positive (or "
                                             f"`{none_words[0]}`)")
        return n
    return parse


_windows = _positive_or_none("--windows", ("all",), "a positive integer")
_group_size = _positive_or_none("--group-size", ("none", "channel", "-1"),
                                "e.g. 64 (`none`: per-channel)")


def _add_grid(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bits", type=int, choices=BITS, default=4, help="code bit-width")
    p.add_argument("--group-size", type=_group_size, default=64,
                   help="weights per scale along the input dim (`none`: per channel)")
    p.add_argument("--order", choices=ORDERS, default="act", help="quantization order")
    p.add_argument("--clip", choices=CLIPS, default="true",
                   help="true: clamp codes (GPTQ); false: unbounded; ssqr / hptq: no-clipping "
                        "formats")
    p.add_argument("--target-bits", type=float, help="ssqr/hptq: average stored bits per weight")
    p.add_argument("--outlier-density", type=float, help="ssqr: fraction of weights as outliers")
    p.add_argument("--refine", type=int, default=0, metavar="SWEEPS",
                   help="coordinate-descent sweeps after Babai (never raise the error; 0: off)")


def _add_calibration(p: argparse.ArgumentParser, windows: int, seq_len: int) -> None:
    p.add_argument("--calib-file", help="calibration text (default: WikiText-2 wiki.valid.tokens)")
    p.add_argument("--calib-windows", type=int, default=windows, help="calibration windows")
    p.add_argument("--calib-len", type=int, default=seq_len, help="tokens per window")
    p.add_argument("--seed", type=int, default=0, help="seed of the window draw")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="babai-ao", description="Weight quantization with Babai's nearest-plane "
                "algorithm (GPTQ with certificates).")
    p.add_argument("--version", action="version", version=f"babai-ao {__version__}")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    q = sub.add_parser("quantize", help="quantize a model and save it (safetensors)")
    q.add_argument("model", help=f"`{SMOLLM2}`, a transformers directory or a .gguf file")
    _add_grid(q)
    _add_calibration(q, 128, 512)
    q.add_argument("--mode", choices=QUANT_MODES, default="sequential",
                   help="sequential (block by block), observe (float Hessians), rtn")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    q.add_argument("--num-layers", type=int, help="keep only the first N decoder blocks")
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="WikiText-2 perplexity (and a generation sample)")
    e.add_argument("model", help=f"a directory from `quantize`, `{SMOLLM2}`, or a .gguf file")
    e.add_argument("--windows", type=_windows, default=40, help="first N windows, or `all`")
    e.add_argument("--seq-len", type=int, default=2048, help="tokens per window")
    e.add_argument("--data-file", help="test text (default: WikiText-2 wiki.test.raw)")
    e.add_argument("--generate", metavar="PROMPT", help="also print a greedy continuation")
    e.add_argument("--new-tokens", type=int, default=20)
    e.add_argument("--num-layers", type=int, help="keep only the first N decoder blocks")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="export to .pte / .onnx, run it once, print max |diff|")
    x.add_argument("model", help=f"a directory from `quantize` or `{SMOLLM2}`")
    x.add_argument("--format", choices=tuple(EXPORT_MODES), required=True)
    x.add_argument("--mode", help="pte: weight_only | 8da4w; onnx: qdq | matmulnbits")
    x.add_argument("--out", help="output file (default: MODEL_DIR/model.FORMAT)")
    x.add_argument("--seq-len", type=int, default=16, help="tokens of the check input")
    x.add_argument("--num-layers", type=int, help="keep only the first N decoder blocks")
    x.add_argument("--quantize-embedding", choices=("none", "4", "8"), default="none",
                   help="round the token embedding (and a tied lm_head) to 4 or 8 bits "
                        "before exporting (babai_ao.quantize_embeddings_)")
    x.add_argument("--embedding-group-size", type=int, default=64,
                   help="group size of the quantized embedding, along its dimension (64)")
    x.set_defaults(func=cmd_export)

    r = sub.add_parser("report", help="per-layer table and PNG plots from saved runs")
    r.add_argument("runs", nargs="+", help="run directories (or benchmarks/p1.py JSON files)")
    r.add_argument("--out", help="output directory (default: FIRST_RUN/report)")
    r.add_argument("--float-ppl", type=float, help="float perplexity to draw as a line")
    r.set_defaults(func=cmd_report)

    d = sub.add_parser("demo", help="the whole story on SmolLM2 in a few minutes")
    d.add_argument("--out", default="babai-ao-demo", help="output directory")
    d.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _add_calibration(d, 16, 512)
    d.add_argument("--windows", type=_windows, default=8, help="evaluation windows")
    d.add_argument("--seq-len", type=int, default=512, help="tokens per evaluation window")
    d.add_argument("--num-layers", type=int, help="keep only the first N decoder blocks")
    d.add_argument("--export-layers", type=int, default=2,
                   help="decoder blocks in the exported .pte/.onnx (0: skip export)")
    d.add_argument("--new-tokens", type=int, default=8, help="tokens of compiled generation")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)
    return p


KNOWN_ERRORS = (BabaiError, FileNotFoundError, NotADirectoryError, PermissionError)


# Import-time chatter of dependencies that says nothing about the user's run: torchao's
# CUDA-only extensions failing to load on CPU, torch's pytree deprecation notes.
QUIET_LOGGERS = ("torchao", "torch.utils._pytree")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``babai-ao`` console script; returns the exit status."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a bad argument (already printed)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except KNOWN_ERRORS as e:
        print(f"babai-ao: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("babai-ao: interrupted (no partial output was left)", file=sys.stderr)
        return EXIT_INTERRUPT


if __name__ == "__main__":
    sys.exit(main())
