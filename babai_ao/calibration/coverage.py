"""What a quantization run left in float, so that nothing stays float silently.

After ``quantize_model``, every parameter of the model is either a quantized weight (a row
of the report) or listed here with its size and why it is float: ``embedding``,
``lm_head``, ``norm``, ``bias``, ``router`` (MoE gates), ``not selected`` (a layer the
``filter_fn`` left out), ``outside blocks`` (a linear outside the block list, e.g. BERT's
pooler) or ``other``. Tied parameters (``lm_head.weight`` = ``embed_tokens.weight``) are one
tensor: counted once, under their first name, with the others in ``tied``. The shares are of
the model's distinct parameters: ``quantized + Σ float = total``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from .layers import is_quantizable


@dataclass(frozen=True)
class FloatParameter:
    """A parameter left in float: its name, number of elements and kind."""

    name: str
    numel: int
    kind: str
    tied: tuple[str, ...] = ()


def _kind(model: nn.Module, module: nn.Module, name: str, param: str, in_blocks: bool) -> str:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    leaf = name.rsplit(".", 1)[-1]
    if module is out or leaf == "lm_head":
        return "lm_head"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if "norm" in type(module).__name__.lower() or "norm" in leaf.lower():
        return "norm"
    if param == "bias":
        return "bias"
    if "router" in type(module).__name__.lower() or leaf in ("router", "gate"):
        return "router"
    if is_quantizable(module):
        return "not selected" if in_blocks else "outside blocks"
    return "other"


def float_parameters(model: nn.Module, quantized: Iterable[str], blocks_path: str
                     ) -> tuple[list[FloatParameter], int]:
    """``(float parameters, elements of the quantized ones)`` of ``model``.

    ``quantized``: the qualified names of the quantized weights (``….q_proj.weight``); a
    float layer weight inside the blocks (``blocks_path``) is one the run did not select.
    """
    quantized = set(quantized)
    modules = dict(model.named_modules())
    names: dict[int, list[str]] = {}
    tensors: dict[int, int] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
        tensors[id(p)] = p.numel()
    floats: list[FloatParameter] = []
    quantized_numel = 0
    for key, aliases in names.items():
        if any(a in quantized for a in aliases):
            quantized_numel += tensors[key]
            continue
        first = aliases[0]
        owner, _, param = first.rpartition(".")
        kind = _kind(model, modules[owner], owner, param, owner.startswith(blocks_path + "."))
        floats.append(FloatParameter(first, tensors[key], kind, tuple(aliases[1:])))
    # modules that hold quantized weights as packed buffers, not parameters (MoE experts)
    quantized_numel += sum(m.quantized_numel() for m in model.modules()
                           if callable(getattr(m, "quantized_numel", None)))
    return floats, quantized_numel
