"""``babai-ao report``: per-layer tables and plots from saved runs."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from babai_ao.errors import BabaiError

from .depth import Depth, ppl_depth
from .output import say


def run_section(rec: dict[str, Any]) -> list[str]:
    """``report.md`` lines of one run: heading (with the cut, if any), settings, results,
    what the certificates say, and the layer table."""
    from .runs import bound_summary, format_ppl, layer_table

    depth, ppl, bits = ppl_depth(rec), rec.get("ppl"), rec.get("avg_bits_per_weight")
    lines = [f"## {rec['label']}" + (f" ({depth.note()})" if depth.cut else ""), ""]
    if depth.cut:
        lines += [f"**Cut model**: only the {depth.label} were kept (`--num-layers`); the "
                  "perplexity below is that of the cut model, not of the full model.", ""]
    lines += [f"model {rec.get('model', '?')}, method {rec.get('method')}, bits "
              f"{rec.get('bits')}, group {rec.get('group_size')}, order {rec.get('order')}, "
              f"clip {rec.get('clip')}, mode {rec.get('mode')}; stored bits/weight "
              f"{'n/a' if bits is None else f'{bits:.3f}'}; perplexity "
              f"{'not evaluated' if ppl is None else format_ppl(ppl)}", ""]
    if rec.get("layers"):
        lines += [f"certificates: {bound_summary(rec['layers'])}", "", layer_table(rec), ""]
    return lines


def write_report(records: Sequence[dict[str, Any]], out: Path,
                 float_ppl: float | None = None) -> list[Path]:
    """``report.md`` (one layer table per run) and the PNG plots, into ``out``."""
    from . import plots

    written = []
    parts = ["# babai-ao report", ""]
    for rec in records:
        parts += run_section(rec)
        if rec.get("layers"):
            written.append(plots.error_vs_bound(rec, out / f"error_vs_bound_{rec['label']}.png"))
    if sum(r.get("ppl") is not None and r.get("avg_bits_per_weight") is not None
           for r in records) >= 2:
        written.append(plots.bits_vs_perplexity(records, out / "bits_vs_ppl.png", float_ppl))
    md = out / "report.md"
    md.write_text("\n".join(parts))
    return [md, *written]


def cmd_report(args: argparse.Namespace) -> int:
    from .runs import load_run

    records = [load_run(p) for p in args.runs]
    labels = [r["label"] for r in records]
    if len(set(labels)) != len(labels):
        raise BabaiError(f"runs share a name ({labels}): give runs with distinct directory "
                         "or file names")
    out = Path(args.out) if args.out else (Path(args.runs[0]) if Path(args.runs[0]).is_dir()
                                           else Path(args.runs[0]).parent) / "report"
    out.mkdir(parents=True, exist_ok=True)
    written = write_report(records, out, args.float_ppl)
    for rec in records:
        if rec.get("layers"):
            from .runs import layer_table

            note = Depth.of_record(rec).note()
            say(f"{rec['label']}{f' ({note})' if note else ''}:\n{layer_table(rec)}")
    say("wrote " + ", ".join(str(p) for p in written))
    return 0
