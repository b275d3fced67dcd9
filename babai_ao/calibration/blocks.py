"""A model's blocks, and one block driven on calibration data.

``decoder_blocks`` finds the block list (``discovery.find_blocks``: ``model.layers`` for
Llama, ``transformer.h`` for GPT-2, ``bert.encoder.layer`` for BERT); ``calibration_batches``
(``batches``) checks and batches the token ids and masks; ``first_block_inputs`` captures
what the model passes to its first block (hidden states, position embeddings, masks) by
stopping the forward there; ``run_block`` runs a block on one captured input;
``linear_stages`` groups a block's linears (``nn.Linear`` and ``Conv1D``) by the very tensor
they read (q/k/v; gate/up), in call order, from one probe forward; ``block_signature``
says when a block is built like the one before it (same class, same linears and shapes), so
the stages found for that one can be reused instead of probing again.
Forwards end early by raising ``StopForward`` from a hook.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from babai_ao.errors import BabaiError

from .batches import Batch, calibration_batches, model_forward
from .discovery import BLOCK_PATHS, find_blocks
from .layers import is_quantizable

__all__ = ["BLOCK_PATHS", "StopForward", "calibration_batches", "decoder_blocks",
           "block_signature", "first_block_inputs", "linear_stages", "run_block"]

class StopForward(Exception):
    """Raised inside a hook to end a forward early."""


def decoder_blocks(model: nn.Module, blocks: str | None = None) -> tuple[str, nn.ModuleList]:
    """The block list and its attribute path (``model.layers`` for Llama): ``find_blocks``."""
    return find_blocks(model, blocks)


def first_block_inputs(model: nn.Module, block: nn.Module, batches: Sequence[Batch]
                        ) -> list[tuple[torch.Tensor, tuple, dict]]:
    """``(hidden_states, other args, kwargs)`` that the model passes to its first block (the
    attention mask, if any, as the model prepared it for its blocks)."""
    captured: list[tuple[torch.Tensor, tuple, dict]] = []

    def grab(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, tuple(args[1:]), kwargs))
        raise StopForward

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in batches:
            with contextlib.suppress(StopForward):
                model_forward(model, batch)
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise BabaiError("the model did not call its first block on the calibration data: "
                         "pass blocks='<path>' naming the block list its forward runs")
    return captured


def run_block(block: nn.Module, inp: tuple[torch.Tensor, tuple, dict]) -> torch.Tensor | None:
    hidden, args, kwargs = inp
    try:
        out = block(hidden, *args, **kwargs)
    except StopForward:
        return None
    return out[0] if isinstance(out, tuple) else out


def block_signature(block: nn.Module) -> tuple:
    """What ``linear_stages`` depends on besides the data: the block's class and its
    quantizable linears (name, class, weight shape) in registration order."""
    return (type(block), tuple((n, type(m), tuple(m.weight.shape))
                               for n, m in block.named_modules() if is_quantizable(m)))


def linear_stages(block: nn.Module, inp: tuple[torch.Tensor, tuple, dict]
            ) -> tuple[list[list[str]], set[str]]:
    """Linears grouped by identical input tensor, in call order; and those called > once."""
    linears = {n: m for n, m in block.named_modules() if is_quantizable(m)}
    calls: list[tuple[str, torch.Tensor]] = []
    seen: dict[str, int] = {}

    def hook_for(name: str):
        def hook(_m: nn.Module, args: tuple) -> None:
            seen[name] = seen.get(name, 0) + 1
            if seen[name] == 1:
                calls.append((name, args[0]))
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in linears.items()]
    try:
        with torch.no_grad():
            run_block(block, inp)
    finally:
        for h in handles:
            h.remove()
    unused = sorted(set(linears) - set(seen))
    if unused:
        raise BabaiError(f"linears {unused} never ran on the calibration data, so they have no "
                         "Hessian: quantize_model needs every linear of a block to be used")
    stages: list[list[str]] = []
    stage_input: list[torch.Tensor] = []
    for name, x in calls:
        for i, xs in enumerate(stage_input):
            if x is xs:
                stages[i].append(name)
                break
        else:
            stages.append([name])
            stage_input.append(x)
    repeated = {n for n, c in seen.items() if c > 1}
    return stages, repeated
