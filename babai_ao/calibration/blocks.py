"""A model's decoder blocks, and one block driven on calibration data.

``decoder_blocks`` finds the block list (``model.layers`` for Llama); ``calibration_batches``
checks and batches the token ids; ``first_block_inputs`` captures what the model passes to
its first block (hidden states, position embeddings, masks) by stopping the forward there;
``run_block`` runs a block on one captured input; ``linear_stages`` groups a block's linears
by the very tensor they read (q/k/v; gate/up), in call order, from one probe forward.
Forwards end early by raising ``StopForward`` from a hook.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from babai_ao.errors import BabaiError

# attribute paths of the decoder block list, Llama family first
BLOCK_PATHS = ("model.layers", "model.decoder.layers", "gpt_neox.layers", "transformer.h")


class StopForward(Exception):
    """Raised inside a hook to end a forward early."""


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder block list and its attribute path (``model.layers`` for Llama)."""
    for path in BLOCK_PATHS:
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            if not any(isinstance(m, nn.Linear) for m in obj[0].modules()):
                raise BabaiError(f"{type(model).__name__}.{path} holds no nn.Linear layers: "
                                 "quantize_model quantizes nn.Linear weights of decoder blocks "
                                 "(Llama-family transformers models)")
            return path, obj
    raise BabaiError(
        f"quantize_model found no decoder block list in {type(model).__name__} (looked for "
        f"{', '.join(BLOCK_PATHS)}): it supports transformers decoder-only LMs of the Llama "
        "family (model.model.layers); for other models use the observe/convert flow, "
        "quantize_(model, babai_config(step='observe')) then step='convert'")


def calibration_batches(calibration: Any, batch_size: int) -> list[torch.Tensor]:
    """Calibration ids as a list of ``[b, T]`` int64 batches."""
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() == 1:
            calibration = calibration.unsqueeze(0)
        if calibration.dim() != 2 or calibration.is_floating_point():
            raise BabaiError(f"calibration must be token ids [n, seq_len], got a "
                             f"{calibration.dtype} tensor of shape {tuple(calibration.shape)}: "
                             "use babai_ao.calibration_windows(tokenizer)")
        batches = list(calibration.split(batch_size))
    elif isinstance(calibration, Iterable):
        batches = []
        for item in calibration:
            if isinstance(item, dict):
                item = item["input_ids"]
            if not isinstance(item, torch.Tensor) or item.is_floating_point():
                raise BabaiError("calibration items must be token-id tensors (or dicts with "
                                 "input_ids): use babai_ao.calibration_windows(tokenizer)")
            batches.append(item if item.dim() == 2 else item.reshape(1, -1))
    else:
        raise BabaiError(f"calibration of type {type(calibration).__name__} is not supported: "
                         "pass token ids [n, seq_len] from babai_ao.calibration_windows")
    if not batches or any(b.numel() == 0 for b in batches):
        raise BabaiError("calibration is empty: pass at least one window of token ids")
    return [b.to(torch.int64) for b in batches]


def first_block_inputs(model: nn.Module, block: nn.Module, batches: Sequence[torch.Tensor]
                        ) -> list[tuple[torch.Tensor, tuple, dict]]:
    """``(hidden_states, other args, kwargs)`` that the model passes to its first block."""
    captured: list[tuple[torch.Tensor, tuple, dict]] = []

    def grab(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, tuple(args[1:]), kwargs))
        raise StopForward

    device = next(model.parameters()).device
    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in batches:
            with contextlib.suppress(StopForward):
                model(input_ids=ids.to(device), use_cache=False)
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise BabaiError("the model did not call its first decoder block on the calibration "
                         "data: quantize_model needs a standard decoder forward")
    return captured


def run_block(block: nn.Module, inp: tuple[torch.Tensor, tuple, dict]) -> torch.Tensor | None:
    hidden, args, kwargs = inp
    try:
        out = block(hidden, *args, **kwargs)
    except StopForward:
        return None
    return out[0] if isinstance(out, tuple) else out


def linear_stages(block: nn.Module, inp: tuple[torch.Tensor, tuple, dict]
            ) -> tuple[list[list[str]], set[str]]:
    """Linears grouped by identical input tensor, in call order; and those called > once."""
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
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
