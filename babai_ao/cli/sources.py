"""The ``MODEL`` argument: ``smollm2`` (the bundled model), a ``.gguf`` file, a transformers
directory, or a directory written by ``babai-ao quantize`` (loaded quantized)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from babai_ao.errors import BabaiError

SMOLLM2 = "smollm2"


def keep_first_blocks(model: nn.Module, num_layers: int | None) -> int | None:
    """Cut the decoder block list to its first ``num_layers`` blocks (``None``: keep all).

    Returns the number of blocks the model had before the cut (``None`` when ``num_layers``
    is ``None``: nothing is looked at), so that a cut run can say "first N of M blocks".
    """
    from babai_ao.calibration.blocks import decoder_blocks

    if num_layers is None:
        return None
    if num_layers <= 0:
        raise BabaiError(f"--num-layers {num_layers} must be positive (or left out for all)")
    path, blocks = decoder_blocks(model)
    parent = model.get_submodule(path.rsplit(".", 1)[0])
    setattr(parent, path.rsplit(".", 1)[1], blocks[:num_layers])
    model.config.num_hidden_layers = min(num_layers, len(blocks))
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:num_layers]
    return len(blocks)


def load_model(source: str, num_layers: int | None = None) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from ``smollm2``, a ``.gguf`` file, a transformers checkpoint
    directory, or a directory written by ``babai-ao quantize`` (loaded quantized)."""
    from babai_ao.calibration.models import load_smollm2

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
            from babai_ao.ao.hptq_tensor import decode_model
            from babai_ao.checkpoints.hf import from_pretrained

            model = from_pretrained(path, dtype=torch.float32)
            decode_model(model)  # HPTQ: Huffman stream -> 8-bit compute form, once
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        raise BabaiError(f"model {source!r} is neither `{SMOLLM2}`, a .gguf file, nor a "
                         "directory with config.json: pass one of those")
    keep_first_blocks(model, num_layers)
    return model.eval(), tokenizer
