"""What an export produced: the artifact, its size, and how far it is from eager."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from babai_ao.errors import BabaiError


@dataclass
class ExportReport:
    """``max_abs_diff`` is ``max |runtime − eager|`` over the example inputs (None: not run)."""

    path: Path
    target: str  # "executorch" | "onnx"
    mode: str  # weight_only / 8da4w, or qdq / matmulnbits
    size_bytes: int
    quantized_linears: int
    max_abs_diff: float | None = None
    max_abs_ref: float | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        diff = "not run" if self.max_abs_diff is None else f"{self.max_abs_diff:.3g}"
        return (f"{self.target}/{self.mode}: {self.path} {self.size_bytes / 1024:.1f} KiB, "
                f"{self.quantized_linears} quantized linears, max|diff| vs eager {diff}")


def flat_outputs(out: object) -> list[torch.Tensor]:
    """Tensors of a model output (tensor, tuple/list, or dict), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in flat_outputs(o)]
    raise BabaiError(f"cannot compare an output of type {type(out).__name__}: "
                     "export a model returning tensors (wrap it in a module that returns logits)")


def max_diff(got: list[torch.Tensor], ref: list[torch.Tensor]) -> tuple[float, float]:
    """``(max |got − ref|, max |ref|)`` over matching outputs."""
    if len(got) != len(ref):
        raise BabaiError(f"runtime returned {len(got)} outputs, eager {len(ref)}: "
                         "the exported program's outputs do not match the model's")
    d = max((g.float() - r.float()).abs().max().item() for g, r in zip(got, ref))
    m = max(r.float().abs().max().item() for r in ref)
    return d, m
