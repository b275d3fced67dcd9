"""The ``MODEL`` argument: ``smollm2`` (the bundled model), a ``.gguf`` file, a transformers
directory, or a directory written by ``babai-ao quantize`` (loaded quantized)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from babai_ao.errors import BabaiError

SMOLLM2 = "smollm2"
GGUF_MAGIC = b"GGUF"


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


@dataclass(frozen=True)
class ModelSource:
    """Where a ``MODEL`` argument points: ``kind`` is ``smollm2``, ``gguf``, ``transformers``
    or ``run`` (a directory written by ``babai-ao quantize``)."""

    kind: str
    directory: Path
    gguf_file: str | None = None


def resolve(source: str) -> ModelSource:
    """Check ``source`` names a model this command can load, by its files alone."""
    from babai_ao.calibration.models import smollm2_gguf

    from .runs import RUN_FILE

    if source.lower() == SMOLLM2:
        gguf = smollm2_gguf()  # BabaiError with the install command if missing
        return ModelSource(SMOLLM2, gguf.parent, gguf.name)
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise BabaiError(f"GGUF file {path} does not exist: give the path of a .gguf file "
                             f"or `{SMOLLM2}` for the bundled model")
        with path.open("rb") as f:
            magic = f.read(len(GGUF_MAGIC))
        if magic != GGUF_MAGIC:
            raise BabaiError(f"{path} is not a GGUF file (it starts with {magic!r}, not "
                             f"{GGUF_MAGIC!r}): give a real .gguf model file")
        return ModelSource("gguf", path.parent, path.name)
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource("run" if (path / RUN_FILE).is_file() else "transformers", path)
    raise BabaiError(f"model {source!r} is neither `{SMOLLM2}`, a .gguf file, nor a "
                     "directory with config.json: pass one of those")


@functools.lru_cache(maxsize=8)
def model_config(source: str) -> Any:
    """The model's transformers config, read without loading any weight."""
    from transformers import AutoConfig

    from babai_ao.calibration.models import fp32_copy_dir

    where = resolve(source)
    if where.kind == SMOLLM2 and (fp32_copy_dir() / "config.json").is_file():
        where = ModelSource(SMOLLM2, fp32_copy_dir())  # the converted copy: no GGUF parse
    try:
        return AutoConfig.from_pretrained(where.directory, gguf_file=where.gguf_file)
    except (OSError, ValueError, KeyError) as e:
        raise BabaiError(f"cannot read the model config of {source}: {e}".rstrip(". ")
                         + ": give a transformers directory, a .gguf file or `smollm2`") from None


def load_model(source: str, num_layers: int | None = None) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from ``smollm2``, a ``.gguf`` file, a transformers checkpoint
    directory, or a directory written by ``babai-ao quantize`` (loaded quantized)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from babai_ao.calibration.models import load_smollm2

    where = resolve(source)
    if where.kind == SMOLLM2:
        return load_smollm2(num_layers=num_layers)
    if where.kind == "gguf":
        model = AutoModelForCausalLM.from_pretrained(where.directory, gguf_file=where.gguf_file,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(where.directory, gguf_file=where.gguf_file)
    elif where.kind == "run":
        from babai_ao.ao.hptq_tensor import decode_model
        from babai_ao.checkpoints.hf import from_pretrained

        model = from_pretrained(where.directory, dtype=torch.float32)
        decode_model(model)  # HPTQ: Huffman stream -> 8-bit compute form, once
        tokenizer = AutoTokenizer.from_pretrained(where.directory)
    else:
        model = AutoModelForCausalLM.from_pretrained(where.directory, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(where.directory)
    keep_first_blocks(model, num_layers)
    return model.eval(), tokenizer
