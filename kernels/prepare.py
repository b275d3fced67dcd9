"""``prepare_cpu(model)``: hand each eligible quantized linear to a torch CPU kernel.

For CPU inference in bf16, after loading: 4-bit layers become ``Int4PackLinear``
(``_weight_int4pack_mm_for_cpu``), 8-bit one-group-per-row layers — HPTQ's decoded form —
``Int8PackLinear`` (``_weight_int8pack_mm``); HPTQ weights still in their stored (Huffman)
form are decoded first. HPTQ layers (stored or decoded) whose codes mostly fit a 16-value
window per group become ``Int4SparseLinear`` (``cpu_hptq``: window nibbles + sparse
correction in one C++ op, fp32 sums) instead, the int8 path being the fallback. Each new
module's forward is one kernel call (the aten op, or ``babai_cpu::hptq_linear``), so a
compiled graph calls the kernel directly. The aten kernels compute in bf16 (fp32 inputs are
cast); all hold only the kernel's layout: save the model before preparing, not after.
Layers that do not qualify (other widths or groups, SSQR outliers, non-CPU) keep
``babai::linear``. 4-bit layers no longer need it for speed: a ``BabaiQuantizedTensor``'s
``F.linear`` on CPU runs the same int4pack kernel by default (``babai_ao.ao.tensor``); here
they also drop the packed copy the tensor keeps for saving and export.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .cpu_hptq import Int4SparseLinear
from .cpu_int4 import Int4PackLinear
from .cpu_int8 import Int8PackLinear

KERNELS = (Int4PackLinear, Int8PackLinear)


def prepare_cpu(model: nn.Module) -> dict[str, int]:
    """Swap eligible linears in place; returns how many became each kernel module."""
    from babai_ao.ao.hptq_tensor import HuffmanQuantizedTensor, prepare_hptq_cpu
    from babai_ao.ao.tensor import BabaiQuantizedTensor  # needs torchao: on use

    counts = {k.__name__: 0 for k in (*KERNELS, Int4SparseLinear)}
    wider = False
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            w = child.weight.detach()
            hptq = prepare_hptq_cpu(w, child.bias) if isinstance(
                w, (HuffmanQuantizedTensor, BabaiQuantizedTensor)) else None
            if hptq is not None:
                setattr(parent, name, hptq)
                counts[Int4SparseLinear.__name__] += 1
                wider |= w.dtype != torch.bfloat16
                continue
            if isinstance(w, HuffmanQuantizedTensor) and w.device.type == "cpu":
                w = w.decode()
            if not (isinstance(w, BabaiQuantizedTensor) and not w.transposed
                    and w.device.type == "cpu"):
                continue
            for kernel in KERNELS:
                if kernel.eligible(w):
                    setattr(parent, name, kernel.from_weight(w, child.bias))
                    counts[kernel.__name__] += 1
                    wider |= w.dtype != torch.bfloat16
                    break
    if wider:
        warnings.warn("prepare_cpu: the swapped layers compute in bfloat16 while the model "
                      "is not bf16 (its activations are cast at each layer): cast the model "
                      "with model.to(torch.bfloat16) first to make that explicit",
                      UserWarning, stacklevel=2)
    return counts
