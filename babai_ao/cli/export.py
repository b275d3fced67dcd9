"""``babai-ao export``: ``.pte``, ``.onnx``, ``.gguf`` or a compressed-tensors directory (vLLM),
run once, max |logits − eager| printed.

GGUF (``babai_ao.checkpoints.gguf``) is read back through transformers' GGUF loader, which
dequantizes it with gguf-py, and run once like the other formats."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from babai_ao.errors import BabaiError

from .output import say
from .sources import load_model

LEAFSPEC_NOTE = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
EXPORT_MODES = {"pte": ("weight_only", "8da4w"), "onnx": ("qdq", "matmulnbits"),
                "compressed-tensors": ("pack-quantized",),
                "gguf": ("auto", "q4_0", "q4_1", "q8_0")}


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


def export_gguf(model: nn.Module, source: str, mode: str, path: Path, example: torch.Tensor
                ) -> str:
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
    save_gguf(model, path, mode=mode, source=gguf_source)
    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (back(input_ids=example).logits - model(input_ids=example).logits).abs().max()
    mib = path.stat().st_size / 2**20
    return (f"wrote {path} ({mib:.1f} MiB, GGUF {mode}); read back by transformers: max "
            f"|logits - eager| = {float(diff):.3g}")


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
        say(export_gguf(model, args.model, mode, path, example))
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
        with torch.no_grad():
            diff = (loaded(input_ids=example).logits - model(input_ids=example).logits).abs()
        groups = read_quantization_config(tmp)["config_groups"]
    weights = [g["weights"] for g in groups.values()]
    kinds = sorted({f"{w['num_bits']}-bit {w['strategy']} {w['group_size'] or ''}".strip()
                    + ("" if w["symmetric"] else " asymmetric") for w in weights})
    say(f"compressed-tensors pack-quantized ({', '.join(kinds)}) -> {out}; loaded back with "
        f"transformers: max|diff| vs eager {float(diff.max()):.3g} on {seq_len} tokens "
        f"(serve: vllm serve {out})")
    return 0
