"""``babai-ao report``: per-layer tables and plots from saved runs."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from babai_ao.errors import BabaiError

from .output import say


def write_report(records: Sequence[dict[str, Any]], out: Path,
                 float_ppl: float | None = None) -> list[Path]:
    """``report.md`` (one layer table per run) and the PNG plots, into ``out``."""
    from . import plots, runs

    written = []
    parts = ["# babai-ao report", ""]
    for rec in records:
        label = rec["label"]
        ppl = rec.get("ppl")
        bits = rec.get("avg_bits_per_weight")
        parts += [f"## {label}", "",
                  f"method {rec.get('method')}, bits {rec.get('bits')}, group "
                  f"{rec.get('group_size')}, order {rec.get('order')}, clip {rec.get('clip')}, "
                  f"mode {rec.get('mode')}; stored bits/weight "
                  f"{'n/a' if bits is None else f'{bits:.3f}'}; perplexity "
                  f"{'not evaluated' if ppl is None else f'{ppl:.3f}'}", ""]
        if rec.get("layers"):
            parts += [runs.layer_table(rec), ""]
            written.append(plots.error_vs_bound(rec, out / f"error_vs_bound_{label}.png"))
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

            say(f"{rec['label']}:\n{layer_table(rec)}")
    say("wrote " + ", ".join(str(p) for p in written))
    return 0
