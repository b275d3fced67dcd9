"""The P1 accuracy table from ``runs/*.json`` (``benchmarks/p1.py``), with the peer rows.

    python benchmarks/p1_table.py runs/*.json [--peers ../shared/PEERS.md] \
        [--plots out/p1] [--write BENCHMARKS.md]

Prints the markdown section; ``--write`` replaces the section ``## P1 accuracy (SmolLM2-135M,
WikiText-2)`` of that file (up to the next ``## `` heading), or appends it. ``--plots DIR``
writes bits-vs-perplexity (ours and peers) and per-layer error-vs-bound PNGs.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

HEADING = "## P1 accuracy (SmolLM2-135M, WikiText-2)"
DEFAULT_PEERS = Path(__file__).resolve().parent.parent.parent / "shared" / "PEERS.md"


def peer_records(peers_md: Path) -> list[dict[str, Any]]:
    """Quantized rows of PEERS.md's P1 table (16-bit scale + 16-bit zero per group, as stated
    there); rows whose group does not divide 576 are skipped."""
    records = []
    for line in peers_md.read_text(encoding="utf-8").splitlines():
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        if len(cells) < 6 or not re.fullmatch(r"\d+", cells[1]) or \
                not re.fullmatch(r"\d+", cells[2]) or 576 % int(cells[2]):
            continue
        bits, group = int(cells[1]), int(cells[2])
        act = "" if cells[3] in ("–", "-") else f" act-order {cells[3]}"
        records.append({"label": f"peer: {cells[0]} w{bits}g{group}{act}", "bits": bits,
                        "group_size": group, "ppl": float(cells[4].replace(",", "")),
                        "avg_bits_per_weight": bits + 32 / group, "time": cells[5]})
    return records


def label(r: dict[str, Any]) -> str:
    if r["method"] == "float":
        return "float32"
    if r["method"] == "rtn":
        return f"RTN w{r['bits']}g{r['group_size']}"
    clip = "" if r.get("clip", True) else " no-clip"
    if r.get("format", "grid") != "grid":
        clip = f" {r['format']}" + (f"@{r['target_bits']}" if r.get("target_bits") else "")
    refine = f" + refine {r['refine']}" if r.get("refine") else ""
    note = f" ({r['label_note']})" if r.get("label_note") else ""
    return f"babai w{r['bits']}g{r['group_size']} {r['order']} {r['mode']}{clip}{refine}{note}"


def fmt_s(x: float | None) -> str:
    return "–" if x is None else f"{x:,.0f} s"


def table(records: list[dict[str, Any]], peers: list[dict[str, Any]]) -> str:
    lines = [
        "| row | bits (codes) | group | order | calibration | PPL (P1) | avg stored bits/weight "
        "| calibrate + quantize (P1 wall) | solver only | E ≤ B (unclipped layers) | "
        "clipped codes | threads | date |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        bc = r.get("bound_checks")
        bound = f"{bc['E_le_B']}/{bc['applicable_unclipped']}" if bc else "–"
        bits = r.get("avg_bits_per_weight")
        lines.append(
            f"| {label(r)} | {r.get('bits', 32)} | {r.get('group_size', '–')} | "
            f"{r.get('order', '–')} | {r.get('mode', '–')} | **{r['ppl']:.3f}** | "
            f"{'–' if bits is None else f'{bits:.4g}'} | {fmt_s(r.get('quant_seconds'))} | "
            f"{fmt_s(r.get('solver_seconds'))} | {bound} | {r.get('clipped_total', '–')} | "
            f"{r['threads']} | {r['date'][:16]} |")
    for p in peers:
        lines.append(f"| {p['label']} | {p['bits']} | {p['group_size']} | | | {p['ppl']:.3f} | "
                     f"{p['avg_bits_per_weight']:.4g} | {p['time']} (their session) | | | | | "
                     "PEERS.md |")
    return "\n".join(lines)


def write_section(path: Path, section: str, heading: str = HEADING) -> None:
    """Replace the ``heading`` section of ``path`` (up to the next ``## ``) or append it."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    start = text.find(heading)
    body = section.rstrip("\n") + "\n"
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + body
    else:
        nxt = text.find("\n## ", start + len(heading))
        rest = "" if nxt < 0 else "\n" + text[nxt + 1 :]
        text = text[:start] + body + rest
    path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--peers", type=Path, default=DEFAULT_PEERS)
    p.add_argument("--plots", type=Path)
    p.add_argument("--write", type=Path)
    p.add_argument("--notes", default="", help="markdown inserted under the table")
    args = p.parse_args(argv)
    records = [json.loads(Path(f).read_text()) for f in args.runs]
    peers = peer_records(args.peers) if args.peers.exists() else []
    commands = "\n".join(f"    {r['command']}" for r in records)
    section = "\n".join([
        HEADING, "",
        "Protocol P1 (`../shared/BENCHMARK-PROTOCOL.md`): SmolLM2-135M-Instruct fp32 on CPU, "
        "every decoder linear quantized (210), asymmetric min-max grids, damp 0.01; "
        "calibration 128 × 512 tokens of wiki.valid.tokens (seed 0, "
        "`babai_ao.calibration_windows`); PPL on the first 40 × 2048-token windows of "
        "wiki.test.raw (CRLF read as `\\n`, 301,948 tokens, as the P1 reference numbers). "
        "Stored bits/weight count every byte of the installed `BabaiQuantizedTensor`s "
        "(packed codes, fp16 scales, zeros packed at the code width; peers: 16-bit scale and "
        "zero per group). Times: wall clock on a 2-core machine shared with other jobs "
        "(load average recorded in each JSON), so they are inflated and only roughly "
        "comparable; the solver column is the sum of `quantize_weight` times.",
        "", table(records, peers), "", args.notes, "", "Commands (one per row, in this order):",
        "", commands, ""])
    print(section)
    if args.write:
        write_section(args.write, section)
    if args.plots:
        from babai_ao.cli.plots import bits_vs_perplexity, error_vs_bound

        args.plots.mkdir(parents=True, exist_ok=True)
        flt = next((r["ppl"] for r in records if r["method"] == "float"), None)
        quantized = [{**r, "label": label(r)} for r in records if r["method"] != "float"]
        bits_vs_perplexity([*quantized, *peers], args.plots / "p1_bits_vs_ppl.png", flt)
        for r in quantized:
            if r.get("method") == "babai":
                name = re.sub(r"[^A-Za-z0-9+.-]+", "_", label(r)).strip("_")
                error_vs_bound(r, args.plots / f"p1_error_vs_bound_{name}.png")


if __name__ == "__main__":
    main()
