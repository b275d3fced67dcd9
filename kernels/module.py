"""``PackedLinear``: an ``nn.Module`` holding one layer in the packed format, whose forward is
one ``torch.ops.babai.linear`` call (a stand-in for the tensor subclass in tests/benchmarks).
"""

from __future__ import annotations

import torch
from torch import nn

from babai_ao.ao.ops import linear as _linear  # noqa: F401  (registers babai::linear)
from babai_ao.formats.packing import pack
from babai_ao.lattice.grid import Grid


class PackedLinear(nn.Module):
    """``y = x @ Wᵀ + b`` with ``W[n, k] = s[n, k//g] · (q[n, k] − z[n, k//g])``."""

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 bias: torch.Tensor | None, bits: int, group_size: int, in_features: int):
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.register_buffer("bias", bias)
        self.bits, self.group_size, self.in_features = bits, group_size, in_features
        self.out_features = packed.shape[0]

    @classmethod
    def from_linear(cls, layer: nn.Linear, bits: int = 4, group_size: int = 64,
                    hessian: torch.Tensor | None = None) -> PackedLinear:
        """Quantize ``layer``: nearest plane (``babai_ao.quantize_weight``) given a Hessian,
        else plain round-to-nearest on the same asymmetric min-max grid (fast)."""
        w = layer.weight.detach().float()
        n, k = w.shape
        if hessian is not None:
            from babai_ao.lattice.quantize import quantize_weight

            qw = quantize_weight(w, hessian, bits=bits, group_size=group_size)
            codes, scales, zeros = qw.codes, qw.scales, qw.zeros
        else:
            grid = Grid(bits=bits)
            groups = w.reshape(n * k // group_size, group_size)
            scales, zeros = grid.fit(groups)
            codes = grid.round(groups, scales[:, None], zeros[:, None]).reshape(n, k)
            scales, zeros = scales.reshape(n, -1), zeros.reshape(n, -1)
        bias = None if layer.bias is None else layer.bias.detach().clone()
        return cls(pack(codes.int(), bits), scales.to(torch.float16),
                   pack(zeros.int().reshape(1, -1), bits).reshape(-1), bias, bits,
                   group_size, layer.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.babai.linear(x, self.packed, self.scales, self.zeros, self.bias,
                                      self.bits, self.group_size, self.in_features)


def pack_linears(model: nn.Module, bits: int = 4, group_size: int = 64,
                 skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace every ``nn.Linear`` (names not containing ``skip``) by ``PackedLinear``."""
    count = 0
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and not any(s in full for s in skip):
                setattr(mod, child_name, PackedLinear.from_linear(child, bits, group_size))
                count += 1
    return count
