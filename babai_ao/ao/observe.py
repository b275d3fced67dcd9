"""Observers for the observe/convert flow: ``H = Σ XᵀX`` of each linear's inputs.

``observe(linear)`` registers a forward pre-hook that adds every input batch ``x[..., K]`` of
the layer to a ``HessianAccumulator`` kept on the module; ``stop_observing(linear)`` removes
the hook and returns the accumulator. The float weight is untouched while observing, so the
model computes exactly as before.
"""

from __future__ import annotations

import torch
from torch import nn

from babai_ao.errors import BabaiError
from babai_ao.lattice.hessian import HessianAccumulator

ACCUMULATOR = "babai_hessian"
_HANDLE = "_babai_observer_handle"


def _accumulate(module: nn.Module, args: tuple) -> None:
    if not args:
        raise BabaiError("an observed linear was called without a positional input: call it "
                         "as linear(x) while observing")
    with torch.no_grad():
        getattr(module, ACCUMULATOR).add(args[0].detach())


def observe(linear: nn.Linear, dtype: torch.dtype = torch.float32) -> HessianAccumulator:
    """Start accumulating ``XᵀX`` of ``linear``'s inputs; returns the accumulator."""
    if is_observed(linear):
        raise BabaiError("this linear is already being observed: run step='convert' (or "
                         "stop_observing) before observing again")
    acc = HessianAccumulator(linear.in_features, dtype=dtype, device=linear.weight.device)
    setattr(linear, ACCUMULATOR, acc)
    setattr(linear, _HANDLE, linear.register_forward_pre_hook(_accumulate))
    return acc


def is_observed(linear: nn.Module) -> bool:
    return isinstance(getattr(linear, ACCUMULATOR, None), HessianAccumulator)


def stop_observing(linear: nn.Module) -> HessianAccumulator:
    """Remove the observer of ``linear`` and return what it accumulated."""
    if not is_observed(linear):
        raise BabaiError("this linear was never observed: run quantize_(model, "
                         "babai_config(step='observe')) and feed calibration data first")
    acc = getattr(linear, ACCUMULATOR)
    getattr(linear, _HANDLE).remove()
    delattr(linear, ACCUMULATOR)
    delattr(linear, _HANDLE)
    return acc
