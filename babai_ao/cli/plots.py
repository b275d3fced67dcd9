"""PNG plots of run records (``babai_ao.cli.runs``): per-layer error vs Babai's bound, and bits
per weight vs perplexity across runs. Matplotlib with the non-interactive Agg backend.

``*_figure`` build the figure (tests read its axes); ``error_vs_bound`` and
``bits_vs_perplexity`` save it. A cut model (``--num-layers``) is named in the titles or point
labels, perplexity axes turn logarithmic when the values span a decade or more (a cut model's
perplexity is ~1e8), and no axis carries an offset ("1e8") text.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from babai_ao.errors import BabaiError

from .depth import Depth, ppl_depth
from .runs import format_ppl

LOG_SPAN = 10.0  # max/min at or above which an axis is drawn on a log scale
FLAT_LAYERS = 56  # layers drawn on one axis; more: one panel per linear kind (8 Llama blocks)
_BLOCK_LAYER = re.compile(r"\.(\d+)\.(?:.+\.)?([^.]+)$")  # model.layers.3.mlp.up_proj


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _scale_y(ax: Any, values: Sequence[float]) -> None:
    """Log scale when the positive ``values`` span ``LOG_SPAN`` or more, else linear with
    each tick written in full (``12.5``, ``6.5e+07``): no offset or ×10ⁿ text."""
    from matplotlib.ticker import FuncFormatter

    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) >= LOG_SPAN:
        ax.set_yscale("log")
    else:
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:.4g}"))


def short_layer_name(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` → ``b3 q_proj`` (other names: their last part)."""
    m = _BLOCK_LAYER.search(name)
    return f"b{m.group(1)} {m.group(2)}" if m else name.rsplit(".", 1)[-1]


def _titled(what: str, depth: Depth) -> str:
    return f"{what}\n{depth.note()}" if depth.cut else what


def _layer_marks(ax: Any, rows: Sequence[dict[str, Any]], ticks: Sequence[str]) -> None:
    """On ``ax``, one slot per row: bound ``B`` as a bar, error ``E`` as a dot (a red cross
    for a clipped layer, where ``E ≤ B`` is not guaranteed); ``ticks`` name the slots."""
    x = list(range(len(rows)))
    ax.bar(x, [r["bound"] for r in rows], width=0.7, color="tab:blue", alpha=0.35,
           label="bound B = ¼ Σ d·s²")
    fine = [i for i in x if not rows[i].get("clipped", 0)]
    clipped = [i for i in x if rows[i].get("clipped", 0)]
    for idx, style in ((fine, dict(color="tab:orange", label="error E")),
                       (clipped, dict(color="tab:red", marker="x",
                                      label="error E, clipped layer (E ≤ B not guaranteed)"))):
        if idx:
            ax.scatter(idx, [rows[i]["error"] for i in idx], s=22, zorder=3, **style)
    _scale_y(ax, [r[k] for r in rows for k in ("bound", "error")])
    ax.set_xticks(x, ticks, rotation=90 if len(rows) > 8 else 0, fontsize=7)
    ax.set_xlim(-0.6, len(rows) - 0.4)


def _by_kind(rows: Sequence[dict[str, Any]]) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """``{linear kind: [(block, row), ...]}`` in first-seen order (``{}``: names unparsed)."""
    groups: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for r in rows:
        m = _BLOCK_LAYER.search(r["name"])
        if m is None:
            return {}
        groups.setdefault(m.group(2), []).append((m.group(1), r))
    return groups


def error_vs_bound_figure(record: dict[str, Any]) -> Any:
    """Per layer: error ``E`` against Babai's bound ``B``, layers named on the x axis
    (``b3 q_proj``). Past ``FLAT_LAYERS`` layers, one panel per linear kind with the block
    on the x axis, so that a whole model stays readable."""
    rows = record.get("layers") or []
    if not rows:
        raise BabaiError(f"run {record.get('label', '?')} has no per-layer rows: plot a "
                         "quantized run, not a float one")
    groups = _by_kind(rows) if len(rows) > FLAT_LAYERS else {}
    plt = _pyplot()
    if groups:
        width = max(7.0, 0.22 * max(len(g) for g in groups.values()) + 2)
        fig, axes = plt.subplots(len(groups), 1, figsize=(width, 1.7 * len(groups) + 1.2),
                                 squeeze=False)
        for ax, (kind, members) in zip(axes[:, 0], groups.items()):
            _layer_marks(ax, [r for _, r in members], [f"b{b}" for b, _ in members])
            ax.set_ylabel(kind, fontsize=9)
        axes[-1, 0].set_xlabel("decoder block")
        fig.supylabel("output error  tr((W−Q) H (W−Q)ᵀ)", fontsize=9)
    else:
        fig, ax = plt.subplots(figsize=(0.16 * len(rows) + 6.5, 4.8))  # + legend
        axes = [[ax]]
        _layer_marks(ax, rows, [short_layer_name(r["name"]) for r in rows])
        ax.set_xlabel("layer (b<block> <linear>, in quantization order)")
        ax.set_ylabel("output error  tr((W−Q) H (W−Q)ᵀ)")
    first = axes[0][0]
    first.set_title(_titled(f"{record.get('label', 'run')}: per-layer error E vs Babai's "
                            "bound B", Depth.of_record(record)), fontsize=10)
    first.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def error_vs_bound(record: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """``error_vs_bound_figure(record)`` saved as a PNG at ``path``."""
    return _save(error_vs_bound_figure(record), path)


def run_label(record: dict[str, Any]) -> str:
    """``babai 4-bit g64 act`` (and the format of a ``--clip`` other than the default, e.g.
    ``ssqr``) and, when it says more, the run's folder name below it."""
    group, clip = record.get("group_size"), record.get("clip")
    grid = (f"{record.get('method', '?')} {record.get('bits', '?')}-bit "
            f"{'per-channel' if group is None else f'g{group}'} {record.get('order', '')}"
            f"{'' if clip in (None, True, 'true') else f' clip={clip}'}")
    label = record.get("label", "")
    return grid.strip() + (f"\n({label})" if label and label != grid else "")


def _common_depth(records: Sequence[dict[str, Any]]) -> Depth | None:
    depths = {ppl_depth(r) for r in records}
    return depths.pop() if len(depths) == 1 else None


def bits_vs_perplexity_figure(records: Sequence[dict[str, Any]],
                              float_ppl: float | None = None) -> Any:
    """One labelled point per run with both ``avg_bits_per_weight`` and ``ppl``; float as a
    line. A cut shared by all runs goes in the title, else into each point's label."""
    runs = [r for r in records
            if r.get("avg_bits_per_weight") is not None and r.get("ppl") is not None]
    if not runs:
        raise BabaiError("no run has both bits per weight and a perplexity: run "
                         "`babai-ao eval RUN_DIR` on each run first")
    common = _common_depth(runs)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for rec in runs:
        note = "" if common is not None or not ppl_depth(rec).cut else f"\n{ppl_depth(rec).note()}"
        ax.scatter([rec["avg_bits_per_weight"]], [rec["ppl"]], zorder=3)
        ax.annotate(f"{run_label(rec)}\nppl {format_ppl(rec['ppl'])}{note}",
                    (rec["avg_bits_per_weight"], rec["ppl"]), fontsize=7, xytext=(5, 4),
                    textcoords="offset points")
    values = [r["ppl"] for r in runs]
    if float_ppl is not None:
        ax.axhline(float_ppl, color="gray", linestyle="--",
                   label=f"float32: ppl {format_ppl(float_ppl)}")
        ax.legend(fontsize=8)
        values.append(float_ppl)
    _scale_y(ax, values)
    ax.margins(x=0.35, y=0.15)
    ax.set_xlabel("stored bits per weight")
    ax.set_ylabel("perplexity (WikiText-2 test)")
    ax.set_title(_titled("bits per weight vs perplexity", common or Depth()), fontsize=10)
    fig.tight_layout()
    return fig


def bits_vs_perplexity(records: Sequence[dict[str, Any]], path: str | os.PathLike[str],
                       float_ppl: float | None = None) -> Path:
    """``bits_vs_perplexity_figure(records, float_ppl)`` saved as a PNG at ``path``."""
    return _save(bits_vs_perplexity_figure(records, float_ppl), path)
