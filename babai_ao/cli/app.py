"""The ``babai-ao`` parser and entry point: arguments in, one command run, an exit status out.

Errors a user can fix (``BabaiError``, missing files, bad arguments) print one line,
``babai-ao: error: <problem>: <fix>``, and exit with status 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from typing import NoReturn

import torch

from babai_ao import __version__
from babai_ao.errors import BabaiError

from . import preflight
from .evaluate import cmd_eval
from .export import EXPORT_MODES, cmd_export
from .quantize import cmd_quantize
from .report import cmd_report
from .sources import SMOLLM2

BITS = (2, 3, 4, 8)
ORDERS = ("natural", "act", "min-pivot")
CLIPS = ("true", "false", "ssqr", "hptq")
QUANT_MODES = ("sequential", "observe", "rtn")
EXIT_USAGE = 2
EXIT_INTERRUPT = 130


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one line (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"babai-ao: error: {message} (see `{self.prog} --help`)\n")


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run

    return run(args)


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
    p.add_argument("--search", choices=("babai", "kbest"), default="babai",
                   help="kbest: keep --k survivors per row (never a larger error than Babai)")
    p.add_argument("--k", type=int, default=16, help="K-best survivors per row")
    p.add_argument("--symmetric", action="store_true",
                   help="symmetric grid, zero code 2^(b-1) (GGUF Q4_0 / Q8_0)")
    p.add_argument("--exact-offset", action="store_true",
                   help="asymmetric grid with s·z exact in fp16 (GGUF Q4_1)")


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
    q.add_argument("--tune", type=int, default=0, metavar="STEPS",
                   help="block tuning after the codes are fixed: Adam steps per block on "
                        "scales and norms towards the float block (codes, bits unchanged; 0: off)")
    q.add_argument("--tune-lr", type=float, default=None, metavar="LR",
                   help="Adam learning rate of --tune (default 1e-3; the P1 rows in "
                        "BENCHMARKS.md used 2e-3)")
    q.add_argument("--mode", choices=QUANT_MODES, default="sequential",
                   help="sequential (block by block), observe (float Hessians), rtn")
    q.add_argument("--allocate", action=argparse.BooleanOptionalAction, default=None,
                   help="--clip hptq: spread --target-bits over the layers by one "
                        "rate-distortion multiplier with Fisher sensitivities (P1: 25.78 vs "
                        "26.42 at 3.3 bits, 21.52 vs 22.34 at 4.3, 61.0 vs 75.0 at 2.3; "
                        "a float-model pass before the calibration). The default with "
                        "--clip hptq --target-bits when calibrating in one process, "
                        "unstreamed; --no-allocate: each layer's own rate search")
    q.add_argument("--fisher-windows", type=int, default=16, metavar="N",
                   help="--allocate: calibration windows of the Fisher probe (16)")
    q.add_argument("--hessian-tiles", action=argparse.BooleanOptionalAction, default=None,
                   help="form each XᵀX from its upper tiles and mirror it (the default: about "
                        "0.94x the calibration time at P1, same perplexity); "
                        "--no-hessian-tiles: plain products (codes may differ in fp32 ties)")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    q.add_argument("--num-layers", type=int, help="keep only the first N decoder blocks")
    q.add_argument("--stream", action="store_true",
                   help="build the model on the meta device and read, quantize, write and free "
                        "one block at a time (models larger than memory)")
    q.add_argument("--save-state", metavar="DIR",
                   help="streamed run (implies --stream) that saves finished blocks and the next "
                        "block's inputs in DIR; rerunning the same command resumes there")
    q.add_argument("--spill-dir", metavar="DIR",
                   help="streamed run: where the calibration activations are kept on disk "
                        "while it runs (a temporary directory inside DIR, removed at the end; "
                        "default: next to --out)")
    q.add_argument("--no-progress", action="store_true")
    q.add_argument("--nproc", type=int, default=1,
                   help="processes to calibrate in (torch.distributed, launched with torchrun: "
                        "the calibration windows split across them, same codes as one)")
    q.add_argument("--dist-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="with --nproc: how long a process waits for the others before it "
                        "gives up with an error (a failed process stops the others sooner)")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="WikiText-2 perplexity (and a generation sample)")
    e.add_argument("model", help=f"a directory from `quantize`, `{SMOLLM2}`, or a .gguf file")
    e.add_argument("--windows", type=_windows, default=40, help="first N windows, or `all`")
    e.add_argument("--seq-len", type=int, default=2048, help="tokens per window")
    e.add_argument("--data-file", help="test text (default: WikiText-2 wiki.test.raw)")
    e.add_argument("--generate", metavar="PROMPT", help="also print a greedy continuation")
    e.add_argument("--new-tokens", type=int, default=20)
    e.add_argument("--num-layers", type=int, help="keep only the first N decoder blocks")
    e.add_argument("--cpu-kernel", choices=("exact", "auto"), default="exact",
                   help="CPU forwards: exact fp32 path (default; comparable with P1) or the "
                        "default bf16-activation int4pack path (faster, slightly different)")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="export to .pte / .onnx / .gguf / compressed-tensors, run "
                       "it once, print max |diff|")
    x.add_argument("model", help=f"a directory from `quantize` or `{SMOLLM2}`")
    x.add_argument("--format", choices=tuple(EXPORT_MODES), required=True)
    x.add_argument("--mode", help="pte: weight_only | 8da4w; onnx: qdq | matmulnbits; gguf: "
                   "auto | q4_0 | q4_1 | q8_0 | q4_k (calibrates a float MODEL itself); "
                   "compressed-tensors: pack-quantized")
    x.add_argument("--out", help="output file (default: MODEL_DIR/model.FORMAT); "
                                 "compressed-tensors: a new directory (MODEL_DIR/compressed-tensors)")
    x.add_argument("--seq-len", type=int, default=16, help="tokens of the check input")
    x.add_argument("--num-layers", type=int, help="keep only the first N decoder blocks")
    x.add_argument("--quantize-embedding", choices=("none", "4", "8"), default="none",
                   help="round the token embedding (and a tied lm_head) to 4 or 8 bits "
                        "before exporting (babai_ao.quantize_embeddings_)")
    x.add_argument("--embedding-group-size", type=int, default=64,
                   help="group size of the quantized embedding, along its dimension (64)")
    _add_calibration(x, 128, 512)  # gguf q4_k only: Babai calibrates onto the Q4_K grids
    x.add_argument("--grid-fit", choices=("minmax", "weighted", "best"), default="best",
                   help="gguf q4_k: each block's scale/min from its range, or by the "
                        "diag(H)-weighted rounding error (llama.cpp's imatrix criterion), or "
                        "(default) the better of the two by the layer's output error")
    x.add_argument("--no-progress", action="store_true")
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


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """``--no-progress`` turns off transformers' bars (weight loading, shard writing) too;
    babai-ao's own bars take ``progress=`` per call. Restored afterwards."""
    if enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``babai-ao`` console script; returns the exit status."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a bad argument (already printed)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for `quantize --nproc`
    try:
        preflight.check(args)  # every argument, before any model is loaded
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        with progress_bars(not getattr(args, "no_progress", False)):
            return int(args.func(args) or 0)
    except KNOWN_ERRORS as e:
        print(f"babai-ao: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        state = getattr(args, "save_state", None)
        kept = f"; finished blocks are kept in {state}: rerun the same command to resume" \
            if state else ""
        print(f"babai-ao: interrupted (no partial output was left{kept})", file=sys.stderr)
        return EXIT_INTERRUPT


if __name__ == "__main__":
    sys.exit(main())
