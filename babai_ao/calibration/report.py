"""The report of a quantization run: one row per layer (certificate numbers, solver time).

``E`` is the layer's output error ``‖X(w−q)‖²`` summed over rows, ``B = ¼·Σⱼ dⱼ·sⱼ²`` Babai's
bound; ``E ≤ B`` is guaranteed when nothing was clipped (``bound_holds``).
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, field, fields


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

    @property
    def bound_holds(self) -> bool:
        return self.clipped == 0 and self.error <= self.bound * (1 + 1e-6)


@dataclass
class QuantizationReport:
    """Per-layer rows plus totals; ``seconds`` is the wall time of the whole call."""

    mode: str
    rows: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0

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
        lines = ["| layer | tr(D) | error E | bound B | E ≤ B | clipped | bits/weight | s |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            holds = "yes" if r.bound_holds else ("n/a" if r.clipped else "NO")
            lines.append(f"| {r.name} | {r.trace_d:.4g} | {r.error:.4g} | {r.bound:.4g} | "
                         f"{holds} | {r.clipped} | {r.bits_per_weight:.4g} | {r.seconds:.2f} |")
        return "\n".join(lines)
