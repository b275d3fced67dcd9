"""The layers ``quantize_model`` quantizes: ``nn.Linear`` and GPT-2's ``Conv1D``.

Both compute ``y = x·Wᵀ + b`` for a weight ``W`` [out, in]; they differ in how ``W`` is
stored. ``nn.Linear`` keeps ``W`` itself. transformers' ``Conv1D`` (GPT-2, GPT, …) keeps
``Wᵀ`` [in, out] and computes ``addmm(b, x, Wᵀ)``. Its Hessian is that of its input,
``H = XᵀX`` [in, in], as for a linear, and the quantized weight is ``W``, the transpose of the
stored one; installed as a *transposed* ``BabaiQuantizedTensor`` (the view ``Wᵀ`` of the
packed ``W``, whose ``addmm`` runs ``babai::linear``), so the module, its forward and its
state-dict key (``….c_attn.weight``) stay what they were.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from typing import Any

import torch
from torch import nn

from babai_ao.errors import BabaiError
from babai_ao.lattice.quantize import QuantizedWeight


def _conv1d_type() -> type | None:
    """transformers' ``Conv1D`` if transformers is loaded (a model using it has loaded it)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(utils, "Conv1D", None)


def is_conv1d(module: nn.Module) -> bool:
    conv1d = _conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def is_quantizable(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a ``Conv1D``: a layer ``y = x·Wᵀ + b`` with a 2-D weight."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def in_features(module: nn.Module) -> int:
    """``K``, the width of the layer's input (and of its Hessian)."""
    return int(module.weight.shape[0] if is_conv1d(module) else module.weight.shape[1])


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """``W`` [out, in] (detached; for ``Conv1D`` the transpose of the stored weight)."""
    w = module.weight.detach()
    return w.t() if is_conv1d(module) else w


def set_weight(module: nn.Module, tensor: torch.Tensor) -> None:
    """Install ``tensor`` (``W`` [out, in], quantized) as the module's weight, stored the way
    the module stores it (``Conv1D``: the transposed view ``Wᵀ``)."""
    if is_conv1d(module):
        if not hasattr(tensor, "transposed"):
            raise BabaiError(f"{type(tensor).__name__} cannot be stored transposed, as a "
                             "Conv1D (GPT-2) weight needs: use clip=True/False or 'ssqr'")
        tensor = tensor.t()
    module.weight = nn.Parameter(tensor, requires_grad=False)


def install(module: nn.Module, qw: QuantizedWeight) -> None:
    """Replace the layer's weight by a ``BabaiQuantizedTensor`` holding ``qw``.

    Codes outside ``[0, 2^b − 1]`` (``clip=False``) do not fit a ``b``-bit tensor: then the
    dequantized values are written into the float weight (warned once), which keeps the
    model's outputs and the certificate exact; store such weights with ``clip='ssqr'``.
    """
    dtype = module.weight.dtype
    bits = qw.grid.bits
    fits = qw.codes.numel() == 0 or (int(qw.codes.min()) >= 0 and
                                     int(qw.codes.max()) <= 2**bits - 1)
    if not fits or importlib.util.find_spec("torchao") is None:
        if not fits:
            warnings.warn(f"clip=False codes leave the {bits}-bit range: installing "
                          "dequantized float weights (use clip='ssqr' to store them packed)",
                          stacklevel=3)
        with torch.no_grad():
            weight_matrix(module).copy_(qw.dequantize(dtype))  # a view of the stored weight
        return
    from babai_ao.ao.tensor import BabaiQuantizedTensor

    set_weight(module, BabaiQuantizedTensor.from_quantized(qw, dtype))


def quantized_weight_type(module: nn.Module) -> Any:
    """The weight's tensor type when it is not a plain tensor (already quantized), else None."""
    kind = type(module.weight.detach())
    return None if kind is torch.Tensor else kind
