"""PNG plots of run records (``babai_ao.cli.runs``): per-layer error vs Babai's bound, and bits
per weight vs perplexity across runs. Matplotlib with the non-interactive Agg backend."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from babai_ao.errors import BabaiError


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def error_vs_bound(record: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Per layer: output error ``E`` and bound ``B`` (log scale); clipped layers marked,
    since ``E ≤ B`` is only guaranteed when nothing was clipped."""
    rows = record.get("layers") or []
    if not rows:
        raise BabaiError(f"run {record.get('label', '?')} has no per-layer rows: plot a "
                         "quantized run, not a float one")
    plt = _pyplot()
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, len(rows) * 0.06 + 4), 4))
    ax.plot(x, [r["bound"] for r in rows], label="bound B = ¼ Σ d·s²", color="tab:blue")
    ax.scatter(x, [r["error"] for r in rows], s=8, label="error E", color="tab:orange",
               zorder=3)
    clipped = [i for i, r in enumerate(rows) if r.get("clipped", 0) > 0]
    if clipped:
        ax.scatter(clipped, [rows[i]["error"] for i in clipped], s=20, facecolors="none",
                   edgecolors="tab:red", label="clipped (bound not guaranteed)", zorder=4)
    ax.set_yscale("log")
    ax.set_xlabel("layer (in quantization order)")
    ax.set_ylabel("tr((W−Q) H (W−Q)ᵀ)")
    ax.set_title(f"{record.get('label', 'run')}: per-layer error vs Babai's bound")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bits_vs_perplexity(records: Sequence[dict[str, Any]], path: str | os.PathLike[str],
                       float_ppl: float | None = None) -> Path:
    """One point per run with both ``avg_bits_per_weight`` and ``ppl``; float as a line."""
    points = [(r["avg_bits_per_weight"], r["ppl"], r.get("label", "?")) for r in records
              if r.get("avg_bits_per_weight") is not None and r.get("ppl") is not None]
    if not points:
        raise BabaiError("no run has both bits per weight and a perplexity: run "
                         "`babai-ao eval RUN_DIR` on each run first")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for bits, ppl, label in points:
        ax.scatter([bits], [ppl], zorder=3)
        ax.annotate(label, (bits, ppl), fontsize=8, xytext=(4, 4), textcoords="offset points")
    if float_ppl is not None:
        ax.axhline(float_ppl, color="gray", linestyle="--", label=f"float32 ({float_ppl:.2f})")
        ax.legend(fontsize=8)
    ax.set_xlabel("stored bits per weight")
    ax.set_ylabel("perplexity (WikiText-2)")
    ax.set_title("bits per weight vs perplexity")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
