"""The report of a quantization run: one row per layer (certificate numbers, solver time).

``E`` is the layer's output error ``‖X(w−q)‖²`` summed over rows, ``B = ¼·Σⱼ dⱼ·sⱼ²`` Babai's
bound; ``E ≤ B`` is guaranteed when nothing was clipped (``bound_holds``). The parameters
left in float are listed too (``float_parameters``, ``quantized_share``; see ``coverage``).
"""

from __future__ import annotations

import csv
import io
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields

from .coverage import FloatParameter


@dataclass
class LayerReport:
    """One quantized linear: certificate numbers and solver time."""

    name: str
    trace_d: float
    error: float
    error_undamped: float
    bound: float
    clipped: int
    bits_per_weight: float
    seconds: float
    tokens: int
    error_babai: float | None = None  # E of the Babai codes before block tuning (if tuned)

    @property
    def bound_holds(self) -> bool:
        """Babai's guarantee ``E ≤ B``, for the Babai codes on their own grid (before any
        block tuning moved the scales: ``error_babai``)."""
        babai = self.error if self.error_babai is None else self.error_babai
        return self.clipped == 0 and babai <= self.bound * (1 + 1e-6)


@dataclass
class QuantizationReport:
    """Per-layer rows plus totals; ``seconds`` is the wall time of the whole call.

    ``float_parameters``: every parameter left in float, with its size and kind;
    ``quantized_parameters``: elements of the quantized weights. Together they are all the
    model's (distinct) parameters.
    """

    mode: str
    rows: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    float_parameters: list[FloatParameter] = field(default_factory=list)
    quantized_parameters: int = 0
    # block tuning (``tuning``): per block, the block-output MSE before and after, and
    # whether the tuned parameters were kept (only when the MSE went down)
    tuning: list[dict[str, float | str | bool]] = field(default_factory=list)

    @property
    def total_parameters(self) -> int:
        return self.quantized_parameters + sum(p.numel for p in self.float_parameters)

    @property
    def quantized_share(self) -> float:
        """Fraction of the model's parameters that were quantized."""
        total = self.total_parameters
        return self.quantized_parameters / total if total else 0.0

    def float_by_kind(self) -> dict[str, int]:
        """Elements left in float per kind (``embedding``, ``norm``, ``not selected`` …)."""
        kinds: dict[str, int] = defaultdict(int)
        for p in self.float_parameters:
            kinds[p.kind] += p.numel
        return dict(kinds)

    def float_summary(self) -> str:
        """One line: the quantized share and what stayed float, largest kind first."""
        return share_line(self.quantized_parameters, self.float_by_kind())

    @property
    def solver_seconds(self) -> float:
        return sum(r.seconds for r in self.rows)

    def bound_checks(self) -> tuple[int, int]:
        """``(layers with E ≤ B, layers where the bound applies: nothing clipped)``."""
        applicable = [r for r in self.rows if r.clipped == 0]
        return sum(r.bound_holds for r in applicable), len(applicable)

    def to_csv(self, path: str | None = None) -> str:
        buf = io.StringIO()
        names = [f.name for f in fields(LayerReport)]
        writer = csv.DictWriter(buf, fieldnames=[*names, "bound_holds"], lineterminator="\n")
        writer.writeheader()
        for r in self.rows:
            writer.writerow({**asdict(r), "bound_holds": r.bound_holds})
        text = buf.getvalue()
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text

    def to_markdown(self) -> str:
        tuned = any(r.error_babai is not None for r in self.rows)
        head = "| layer | tr(D) | error E | bound B | E ≤ B | clipped | bits/weight | s |"
        if tuned:  # E is then the tuned error; E ≤ B is about the Babai codes (E Babai)
            head = head.replace("| error E |", "| E tuned | E Babai |")
        lines = [head, "|" + "---|" * (head.count("|") - 1)]
        for r in self.rows:
            holds = "yes" if r.bound_holds else ("n/a" if r.clipped else "NO")
            babai = "" if not tuned else (
                f" {r.error:.4g} |" if r.error_babai is None else f" {r.error_babai:.4g} |")
            lines.append(f"| {r.name} | {r.trace_d:.4g} | {r.error:.4g} |{babai} {r.bound:.4g} | "
                         f"{holds} | {r.clipped} | {r.bits_per_weight:.4g} | {r.seconds:.2f} |")
        if self.float_parameters:
            lines += ["", f"Left in float ({self.float_summary()}):", "",
                      "| parameters | kind | tensors | elements | share |", "|---|---|---|---|---|"]
            lines += [f"| {name} | {kind} | {count} | {numel:,} | "
                      f"{numel / self.total_parameters:.2%} |"
                      for name, kind, count, numel in _grouped(self.float_parameters)]
        return "\n".join(lines)


def share_line(quantized: int, float_by_kind: dict[str, int]) -> str:
    """``"87.5% of 112,384 parameters quantized; float: embedding 10.9%, …"`` (shares of
    ``quantized + Σ float``, largest float kind first)."""
    total = quantized + sum(float_by_kind.values())
    kinds = sorted(float_by_kind.items(), key=lambda kv: -kv[1])
    left = ", ".join(f"{k} {n / max(total, 1):.1%}" for k, n in kinds)
    return (f"{quantized / max(total, 1):.1%} of {total:,} parameters quantized; "
            f"float: {left or 'nothing'}")


def _grouped(params: list[FloatParameter]) -> list[tuple[str, str, int, int]]:
    """Float parameters with block indices folded (``model.layers.*.input_layernorm.weight``):
    ``(pattern, kind, tensors, elements)``, in model order."""
    groups: dict[tuple[str, str], list[int]] = {}
    for p in params:
        name = re.sub(r"\.\d+\.", ".*.", p.name)
        if p.tied:
            name += f" (= {', '.join(p.tied)})"
        groups.setdefault((name, p.kind), []).append(p.numel)
    return [(name, kind, len(n), sum(n)) for (name, kind), n in groups.items()]
