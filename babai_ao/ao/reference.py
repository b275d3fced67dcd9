"""The float reference of a quantized model: the same model holding the dequantized weights.

Every claim "the quantized model computes what its codes say" is checked against this: a
copy of the float model in which each quantized weight (``BabaiQuantizedTensor``,
``HuffmanQuantizedTensor``, in its stored layout — GPT-2's ``Conv1D`` keeps [in, out]) and
each ``BabaiExperts`` stack is replaced by its dequantized float values.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .experts import BabaiExperts


def dequantized_model(quantized: nn.Module, float_model: nn.Module) -> nn.Module:
    """A copy of ``float_model`` (same architecture, unquantized) with ``quantized``'s weights
    dequantized into it."""
    ref = copy.deepcopy(float_model)
    targets = dict(ref.named_modules())
    for name, module in quantized.named_modules():
        target = targets.get(name)
        if target is None:
            continue
        if isinstance(module, BabaiExperts):
            target.gate_up_proj.data = module.dequantize("gate_up")
            target.down_proj.data = module.dequantize("down")
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and type(weight.detach()) is not torch.Tensor:
            target.weight.data = weight.detach().dequantize()
    return ref
