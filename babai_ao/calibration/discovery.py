"""Finding a model's stack of blocks (decoder layers, encoder layers) for ``quantize_model``.

The blocks are the ``nn.ModuleList`` of repeated, identically-typed modules that hold the
quantizable layers (``nn.Linear``, ``Conv1D``). ``find_blocks(model)`` tries the known
attribute paths first (``BLOCK_PATHS``: Llama's ``model.layers``, GPT-2's
``transformer.h`` …), then every outermost such list in the model (lists nested inside a
candidate's blocks, such as MoE experts, are part of those blocks) and takes the longest;
``find_blocks(model, "bert.encoder.layer")`` takes the list at a given path. A model where
this finds nothing, or two equally long lists (an encoder and a decoder), gets a one-line
``BabaiError`` naming the lists it saw and the ``blocks=`` argument to pass.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from babai_ao.errors import BabaiError

from .layers import is_quantizable

# attribute paths of the block list, tried first (Llama family first)
BLOCK_PATHS = ("model.layers", "model.decoder.layers", "gpt_neox.layers", "transformer.h")
PASS = "pass blocks='<attribute path of the block nn.ModuleList>' to quantize_model"


def _describe(path: str, blocks: nn.ModuleList) -> str:
    kinds = sorted({type(b).__name__ for b in blocks})
    return f"{path} ({len(blocks)} × {'/'.join(kinds) or 'nothing'})"


def _problem(blocks: nn.Module) -> str | None:
    """Why ``blocks`` is not a block list (``None``: it is one)."""
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        return f"a {type(blocks).__name__}, not an nn.ModuleList"
    if len(blocks) == 0:
        return "empty"
    if len({type(b) for b in blocks}) > 1:
        return "modules of different types"
    if not any(is_quantizable(m) for m in blocks[0].modules()):
        return "no nn.Linear or Conv1D layers"
    return None


def _at(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def candidate_lists(model: nn.Module) -> tuple[list[tuple[str, nn.ModuleList]],
                                               list[tuple[str, nn.ModuleList, str]]]:
    """Outermost block lists ``(path, list)`` of ``model``, and the other ``nn.ModuleList``\\ s
    with the reason each is not one."""
    good: list[tuple[str, nn.ModuleList]] = []
    bad: list[tuple[str, nn.ModuleList, str]] = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or any(
                path.startswith(p + ".") for p, _ in good):
            continue
        problem = _problem(module)
        if problem is None:
            good.append((path, module))
        else:
            bad.append((path, module, problem))
    return good, bad


def _not_found(model: nn.Module, what: str, lists: Sequence[str]) -> BabaiError:
    seen = "; ".join(lists) if lists else "no nn.ModuleList at all"
    return BabaiError(f"quantize_model {what} in {type(model).__name__} (saw: {seen}): {PASS}")


def find_blocks(model: nn.Module, blocks: str | None = None) -> tuple[str, nn.ModuleList]:
    """The block list of ``model`` and its attribute path (``model.layers`` for Llama).

    ``blocks``: the attribute path to use (``"bert.encoder.layer"``); ``None`` finds it.
    """
    if blocks is not None:
        found = _at(model, blocks)
        if found is None:
            raise BabaiError(f"blocks={blocks!r}: {type(model).__name__} has no such submodule: "
                             f"{PASS}")
        problem = _problem(found)
        if problem is not None:
            raise BabaiError(f"blocks={blocks!r} is {problem}: {PASS}")
        return blocks, found  # type: ignore[return-value]
    for path in BLOCK_PATHS:
        found = _at(model, path)
        if found is not None and isinstance(found, nn.ModuleList) and _problem(found) is None:
            return path, found
    good, bad = candidate_lists(model)
    longest = [(p, b) for p, b in good if len(b) == max((len(b) for _, b in good), default=0)]
    if len(longest) == 1:
        return longest[0]
    if len(longest) > 1:
        raise _not_found(model, "found several equally long block lists",
                         [_describe(p, b) for p, b in longest])
    raise _not_found(model, "found no block list (an nn.ModuleList of repeated blocks with "
                     "nn.Linear or Conv1D layers)",
                     [f"{_describe(p, b)}: {why}" for p, b, why in bad[:6]])
