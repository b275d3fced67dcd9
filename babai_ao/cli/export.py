"""``babai-ao export``: ``.pte`` or ``.onnx``, run once, max |logits − eager| printed."""

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
EXPORT_MODES = {"pte": ("weight_only", "8da4w"), "onnx": ("qdq", "matmulnbits")}


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
    path = Path(args.out) if args.out else default / f"model.{args.format}"
    rep = export_model(model, args.format, mode, path, export_example(tokenizer, args.seq_len))
    say(rep.summary())
    return 0
