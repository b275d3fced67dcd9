"""``babai-ao export``: ``.pte``, ``.onnx``, ``.gguf`` or a compressed-tensors directory (vLLM),
run once, max |logits − eager| printed.

GGUF (``babai_ao.checkpoints.gguf``) is read back through transformers' GGUF loader, which
dequantizes it with gguf-py, and run once like the other formats. ``--mode q4_k`` takes a
float model (``smollm2``, a .gguf) and calibrates it itself (``checkpoints.gguf_model``:
Babai onto Q4_K, or Q5_0 where llama.cpp falls back), since no babai-ao tensor holds that
grid: the GGUF file is the one artifact."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from babai_ao.errors import BabaiError
from babai_ao.kernels.cpu_int4 import exact_forwards

from .output import say
from .sources import load_model

LEAFSPEC_NOTE = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
EXPORT_MODES = {"pte": ("weight_only", "8da4w"), "onnx": ("qdq", "matmulnbits"),
                "compressed-tensors": ("pack-quantized",),
                "gguf": ("auto", "q4_0", "q4_1", "q8_0", "q4_k")}


class LogitsOnly(nn.Module):
    """``input_ids [B, T] -> logits [B, T, V]`` (no cache): an exportable causal LM forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def export_model(model: nn.Module, fmt: str, mode: str, path: Path, example: torch.Tensor):
    """Export, run the artifact once on ``example`` and return the ``ExportReport``."""
    from babai_ao.ao import ops  # noqa: F401  (registers babai::linear, which the exporters look up)
    from babai_ao.export import to_executorch, to_onnx

    wrapper = LogitsOnly(model).eval()
    with warnings.catch_warnings():
        # torch's pytree deprecation note, raised ~10 times per ExecuTorch export from
        # torch.export's own pickling of tree specs: nothing the user can act on
        warnings.filterwarnings("ignore", message=LEAFSPEC_NOTE, category=FutureWarning)
        if fmt == "pte":
            return to_executorch(wrapper, (example,), path, mode=mode)
        return to_onnx(wrapper, (example,), path, format=mode)


def export_gguf(model: nn.Module, source: str, mode: str, path: Path, example: torch.Tensor,
                blocks: dict[str, Any] | None = None) -> str:
    """Write ``path`` (tokenizer and metadata from ``source``'s GGUF), load it back with
    transformers and return the one-line summary with max |logits − eager|."""
    from transformers import AutoModelForCausalLM

    from babai_ao.checkpoints.gguf import save_gguf

    from .runs import RUN_FILE, load_run
    from .sources import SMOLLM2, resolve

    where = resolve(source)
    origin = str(load_run(where.directory).get("model") or "") if where.kind == "run" else source
    if origin.lower() != SMOLLM2 and not origin.endswith(".gguf"):
        raise BabaiError(f"{origin or where.directory / RUN_FILE} is not a GGUF model, so "
                         "there is no tokenizer to copy: GGUF export takes models quantized "
                         "from `smollm2` or a .gguf file")
    found = resolve(origin)
    gguf_source = found.directory / str(found.gguf_file)
    save_gguf(model, path, mode=mode, source=gguf_source, blocks=blocks)
    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                dtype=torch.float32).eval()
    with torch.no_grad(), exact_forwards():  # eager = the model's own (exact) numbers
        diff = (back(input_ids=example).logits - model(input_ids=example).logits).abs().max()
    mib = path.stat().st_size / 2**20
    return (f"wrote {path} ({mib:.1f} MiB, GGUF {mode}); read back by transformers: max "
            f"|logits - eager| = {float(diff):.3g}")


def calibrate_q4_k(model: nn.Module, tokenizer: Any, args: argparse.Namespace
                   ) -> dict[str, Any]:
    """Sequential Babai calibration of the float ``model`` onto llama.cpp's Q4_K file types
    (``checkpoints.gguf_model``); returns the blocks and prints one summary line."""
    import time

    from babai_ao.calibration.data import calibration_windows
    from babai_ao.checkpoints.gguf_model import quantize_q4_k_model

    if any(type(p.detach()) is not torch.Tensor for p in model.parameters()):
        raise BabaiError(f"{args.model} holds quantized weights (a quantize run, or "
                         "--quantize-embedding); --mode q4_k calibrates the float model onto "
                         "the Q4_K grids itself: pass `smollm2` or a .gguf file, no embedding")
    calib = calibration_windows(tokenizer, args.calib_file, n=args.calib_windows,
                                seq_len=args.calib_len, seed=args.seed)
    t0 = time.perf_counter()
    blocks, report = quantize_q4_k_model(model, calib, progress=not args.no_progress,
                                         grid_fit=getattr(args, "grid_fit", "best"))
    kinds: dict[str, int] = {}
    for b in blocks.values():
        kinds[b.ggml_type] = kinds.get(b.ggml_type, 0) + 1
    weights = sum(b.data.shape[0] * 8 * b.data.shape[1] / b.bits_per_weight
                  for b in blocks.values())
    bits = sum(8 * b.data.size for b in blocks.values()) / weights
    say(f"babai Q4_K: {len(blocks)} linears ({', '.join(f'{n} {k}' for k, n in kinds.items())})"
        f" calibrated in {time.perf_counter() - t0:.1f} s, {bits:.3f} stored bits/weight, "
        f"E <= B on {sum(r.bound_holds for r in report.rows)}/{len(report.rows)}")
    return blocks


def export_example(tokenizer: Any, seq_len: int) -> torch.Tensor:
    """``[1, seq_len]`` token ids to trace and check the exported model with."""
    ids = tokenizer("The lattice of a linear layer", return_tensors="pt").input_ids[0]
    return ids.repeat(seq_len // ids.numel() + 1)[:seq_len].reshape(1, -1)


def cmd_export(args: argparse.Namespace) -> int:
    modes = EXPORT_MODES[args.format]
    mode = args.mode or modes[0]
    if mode not in modes:
        raise BabaiError(f"--mode {mode} is not a {args.format} mode: choose one of {modes}")
    model, tokenizer = load_model(args.model, args.num_layers)
    if args.quantize_embedding != "none":
        from babai_ao.ao.embedding import quantize_embeddings_

        quantize_embeddings_(model, bits=int(args.quantize_embedding),
                             group_size=args.embedding_group_size)
    default = Path(args.model) if Path(args.model).is_dir() else Path(".")
    if args.format == "compressed-tensors":
        out = Path(args.out) if args.out else default / "compressed-tensors"
        return export_compressed_tensors(model, tokenizer, out, args.seq_len)
    path = Path(args.out) if args.out else default / f"model.{args.format}"
    example = export_example(tokenizer, args.seq_len)
    if args.format == "gguf":
        blocks = calibrate_q4_k(model, tokenizer, args) if mode == "q4_k" else None
        say(export_gguf(model, args.model, mode, path, example, blocks))
        return 0
    rep = export_model(model, args.format, mode, path, example)
    say(rep.summary())
    return 0


def export_compressed_tensors(model: nn.Module, tokenizer: Any, out: Path, seq_len: int) -> int:
    """Write ``out`` (compressed-tensors pack-quantized, atomically), load it back with
    transformers (decompressed to float32) and print max |logits − eager| on ``seq_len``
    tokens."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from babai_ao.checkpoints.compressed_tensors import read_quantization_config
    from babai_ao.checkpoints.compressed_tensors import save_compressed_tensors as save

    from .output import atomic_directory

    example = export_example(tokenizer, seq_len)
    with atomic_directory(out, overwrite=False) as tmp:
        save(model, tmp, tokenizer)
        with warnings.catch_warnings():  # config.json's quantization_config is the one used
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            loaded = AutoModelForCausalLM.from_pretrained(
                tmp, dtype=torch.float32,
                quantization_config=CompressedTensorsConfig(dequantize=True))
        with torch.no_grad(), exact_forwards():  # eager = the model's own (exact) numbers
            diff = (loaded(input_ids=example).logits - model(input_ids=example).logits).abs()
        groups = read_quantization_config(tmp)["config_groups"]
    weights = [g["weights"] for g in groups.values()]
    kinds = sorted({f"{w['num_bits']}-bit {w['strategy']} {w['group_size'] or ''}".strip()
                    + ("" if w["symmetric"] else " asymmetric") for w in weights})
    say(f"compressed-tensors pack-quantized ({', '.join(kinds)}) -> {out}; loaded back with "
        f"transformers: max|diff| vs eager {float(diff.max()):.3g} on {seq_len} tokens "
        f"(serve: vllm serve {out})")
    return 0
