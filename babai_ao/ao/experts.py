"""Fused MoE experts with packed babai codes: the module that replaces a quantized experts block.

transformers 5 holds the experts of a mixture-of-experts layer (Qwen3-MoE, Mixtral, …) as two
3-D parameters, ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I], called as
``experts(hidden_states, top_k_index, top_k_weights)`` by the MoE block after its (float)
router. ``BabaiExperts`` keeps the same call and holds, per expert, the two weights in the
packed format of ``BabaiQuantizedTensor`` (b-bit codes per row, fp16 group scales, packed
zeros), stacked along a leading expert dimension as buffers; its forward is the one custom op
``babai::experts`` (``babai_ao.ao.ops``), so ``torch.compile(fullgraph=True)`` sees one opaque
call with static shapes and the codes are never unpacked into a float weight outside it.
The certificates of every expert's two weights stay on the module (``certificates``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from babai_ao.errors import BabaiError
from babai_ao.formats.packing import packed_size
from babai_ao.lattice.quantize import Certificate, QuantizedWeight

from . import ops
from .tensor import BabaiQuantizedTensor

PARTS = ("gate_up", "down")
CONFIG_KEY = "babai_experts"  # model config entry: how to rebuild BabaiExperts at load


def fused_experts(block: nn.Module) -> dict[str, nn.Module]:
    """The fused experts modules of ``block`` by name (3-D ``gate_up_proj``/``down_proj``)."""
    found = {}
    for name, module in block.named_modules():
        gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
        if not (isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor)
                and gu.dim() == 3 and down.dim() == 3):
            continue
        layout = {"transposed": getattr(module, "is_transposed", False),
                  "bias": getattr(module, "has_bias", False),
                  "no gate": not getattr(module, "has_gate", True),
                  "interleaved": not getattr(module, "is_concatenated", True)}
        odd = [k for k, v in layout.items() if v]
        if odd:
            raise BabaiError(f"{name} ({type(module).__name__}) stores its experts {', '.join(odd)}"
                             ": babai-ao quantizes concatenated [gate; up] experts without bias "
                             "(Qwen3-MoE, Mixtral layout); leave this model's experts float by "
                             "quantizing with mode='observe' on its linears, or open an issue")
        found[name] = module
    return found


class BabaiExperts(nn.Module):
    """Experts whose ``gate_up_proj[e]`` and ``down_proj[e]`` are packed babai weights."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, bits: int,
                 group_size: int, act: str, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if act not in ops.ACTIVATIONS:
            raise BabaiError(f"experts with activation {act!r} cannot be quantized yet: "
                             f"supported {sorted(ops.ACTIVATIONS)}")
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden, intermediate
        self.bits, self.group_size, self.act, self.dtype = bits, group_size, act, dtype
        shapes = {"gate_up": (2 * intermediate, hidden), "down": (hidden, intermediate)}
        for part, (n, k) in shapes.items():
            if k % group_size:
                raise BabaiError(f"group_size={group_size} does not divide the experts' "
                                 f"{part} in_features {k}: choose a divisor of {k}")
            groups = k // group_size
            self.register_buffer(f"{part}_qdata", torch.zeros(
                num_experts, n, packed_size(k, bits), dtype=torch.uint8))
            self.register_buffer(f"{part}_scale", torch.zeros(
                num_experts, n, groups, dtype=torch.float16))
            self.register_buffer(f"{part}_zero_point", torch.zeros(
                num_experts, packed_size(n * groups, bits), dtype=torch.uint8))
        self.certificates: dict[str, list[Certificate | None]] = {
            part: [None] * num_experts for part in PARTS}

    @classmethod
    def from_quantized(cls, gate_up: Sequence[QuantizedWeight], down: Sequence[QuantizedWeight],
                       act: str, dtype: torch.dtype = torch.float32) -> BabaiExperts:
        """Stack per-expert quantized weights (``gate_up[e]`` [2I, H], ``down[e]`` [H, I])."""
        if len(gate_up) != len(down) or not gate_up:
            raise BabaiError("give one gate_up and one down weight per expert")
        first = gate_up[0]
        n2, hidden = first.codes.shape
        module = cls(len(gate_up), hidden, n2 // 2, first.grid.bits, first.group_size, act,
                     dtype)
        for part, weights in (("gate_up", gate_up), ("down", down)):
            for e, qw in enumerate(weights):
                if (qw.grid.bits, qw.group_size) != (module.bits, module.group_size):
                    raise BabaiError("every expert must be quantized with the same bits and "
                                     "group_size")
                t = BabaiQuantizedTensor.from_quantized(qw)
                for field in ("qdata", "scale", "zero_point"):
                    getattr(module, f"{part}_{field}")[e].copy_(getattr(t, field))
                module.certificates[part][e] = qw.certificate
        return module

    def weight(self, part: str, expert: int) -> BabaiQuantizedTensor:
        """Expert ``expert``'s ``gate_up`` or ``down`` weight as a 2-D quantized tensor."""
        n, k = ((2 * self.intermediate_dim, self.hidden_dim) if part == "gate_up"
                else (self.hidden_dim, self.intermediate_dim))
        return BabaiQuantizedTensor._build(
            getattr(self, f"{part}_qdata")[expert], getattr(self, f"{part}_scale")[expert],
            getattr(self, f"{part}_zero_point")[expert], self.bits, self.group_size, (n, k),
            self.dtype, None, self.certificates[part][expert])

    def dequantize(self, part: str) -> torch.Tensor:
        """The float stack [E, N, K] of ``gate_up`` or ``down`` (for references and tests)."""
        return torch.stack([self.weight(part, e).dequantize() for e in range(self.num_experts)])

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        return torch.ops.babai.experts(
            hidden_states, top_k_index, top_k_weights, self.gate_up_qdata, self.gate_up_scale,
            self.gate_up_zero_point, self.down_qdata, self.down_scale, self.down_zero_point,
            self.bits, self.group_size, self.act)

    def quantized_numel(self) -> int:
        """Weights held: ``E · (2I·H + H·I)`` (what the float experts had)."""
        return self.num_experts * 3 * self.intermediate_dim * self.hidden_dim

    @property
    def nbytes_stored(self) -> int:
        """Bytes of the packed codes, scales and zeros of every expert."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def spec(self) -> dict[str, Any]:
        """What a loader needs to rebuild this module empty (written to config.json)."""
        return {"bits": self.bits, "group_size": self.group_size, "act": self.act}

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden={self.hidden_dim}, "
                f"intermediate={self.intermediate_dim}, bits={self.bits}, "
                f"group_size={self.group_size}, act={self.act}")



def install_empty(model: nn.Module) -> int:
    """Replace every fused experts module of a (not yet loaded) model whose config carries
    ``babai_experts`` by an empty ``BabaiExperts`` of the same sizes, so that loading a
    checkpoint fills its packed buffers; returns how many were replaced."""
    spec = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    if not spec:
        return 0
    found = fused_experts(model)
    for name, module in found.items():
        num, n2, hidden = module.gate_up_proj.shape
        empty = BabaiExperts(num, hidden, n2 // 2, spec["bits"], spec["group_size"], spec["act"])
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, empty)
    return len(found)
