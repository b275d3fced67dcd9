"""Issue 21's accuracy frontier at P1: one table per HPTQ budget (≈ 2.3 / 3.3 / 4.3 stored
bits), every lever on its own and combined — order, one-λ allocation, K-best search, block
tuning — from the ``benchmarks/p1.py`` records in ``benchmarks/results/p1/``, with each row's
wall time and the load it ran under (the 2-core box is shared: a time is comparable only
to rows run at the same threads and load). Rows rerun one after another on a quiet box at 2
threads (``benchmarks/results/p1_quiet/``) get their own tables: wall time as a multiple of
the baseline's and the perplexity each extra minute of calibrate + quantize bought,
``(PPL_baseline − PPL_row) / ((t_row − t_baseline) / 60 s)``.

    .venv/bin/python benchmarks/frontier_p1.py            # print the tables
    .venv/bin/python benchmarks/frontier_p1.py --write    # and replace them in BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
P1_RUNS = HERE / "results" / "p1"
QUIET_RUNS = HERE / "results" / "p1_quiet"  # one after another, nothing else running
BENCHMARKS = HERE.parent / "BENCHMARKS.md"
BEGIN, END = "<!-- frontier_p1:begin -->", "<!-- frontier_p1:end -->"
TARGETS = {2.3: 80.0, 3.3: 27.0, 4.3: 22.0}  # issue 21: PPL at most this at the budget


def levers(record: dict) -> list[str]:
    """The levers a record used, in a fixed order (empty: the sequential HPTQ baseline)."""
    out = []
    if record.get("order", "act") != "act":
        out.append(f"{record['order']} order")
    if record.get("allocate"):
        out.append("one λ")
    if record.get("search") == "kbest":
        out.append(f"K-best {record.get('k', 16)}")
    if (record.get("tune") or {}).get("steps"):
        out.append(f"tuning {record['tune']['steps']} steps")
    return out


def rows(runs: Path = P1_RUNS) -> dict[float, list[dict]]:
    """HPTQ records with sequential calibration in ``runs``, by target budget."""
    by_budget: dict[float, list[dict]] = {}
    for path in sorted(runs.glob("babai-hptq*.json")):
        r = json.loads(path.read_text())
        if r.get("format") != "hptq" or r.get("mode") != "sequential":
            continue
        r["name"] = path.stem
        by_budget.setdefault(float(r["target_bits"]), []).append(r)
    return by_budget


def _load(r: dict) -> str:
    start, end = r.get("load_average_start"), r.get("load_average_end")
    if not start or not end:
        return "–"
    return f"{start[0]:.1f} → {end[0]:.1f}"


def table(budget: float, records: list[dict], quiet: bool = False) -> list[str]:
    """One budget's rows, the baseline first. ``quiet`` (rows run one after another on a
    quiet box): each time against the baseline's and the PPL bought per extra minute, in
    place of the threads and the bound check of the shared-box table."""
    base = _baseline(records)
    records = sorted(records, key=lambda r: (r is not base, len(levers(r)), r["ppl"]))
    middle = ("calibrate + quantize | × baseline | PPL per extra minute | solver" if quiet
              else "E ≤ B | calibrate + quantize | solver | threads")
    title = (f"**≈ {budget} bits, quiet box**" if quiet else
             f"**≈ {budget} bits** (target PPL ≤ {TARGETS.get(budget, float('nan')):g})")
    lines = [title, "", f"| levers | stored bits | PPL (P1) | vs baseline | {middle} "
             "| load (1-min avg) | date, git | row |", "|---" * 11 + "|"]
    for r in records:
        delta = ratio = per_minute = "–"
        if base is not None and r is not base:
            delta = f"{r['ppl'] - base['ppl']:+.3f}"
            ratio = f"{r['quant_seconds'] / base['quant_seconds']:.2f}×"
            extra = (r["quant_seconds"] - base["quant_seconds"]) / 60
            if extra > 0 and levers(r):
                per_minute = f"{(base['ppl'] - r['ppl']) / extra:+.3f}"
        time, solver = f"{r['quant_seconds']:,.0f} s", f"{r.get('solver_seconds') or 0:,.0f} s"
        checks = r["bound_checks"]
        cells = ([time, ratio, per_minute, solver] if quiet else
                 [f"{checks['E_le_B']}/{checks['layers']}", time, solver, str(r["threads"])])
        lines.append(f"| {_name(r, base)} | {r['avg_bits_per_weight']:.3f} | {r['ppl']:.3f} | "
                     f"{delta} | {' | '.join(cells)} | {_load(r)} | "
                     f"{r['date'][:16]}, {r['git']} | `{r['name']}` |")
    return lines + [""]


def _threads(by_budget: dict[float, list[dict]]) -> str:
    return "/".join(sorted({str(r["threads"]) for rs in by_budget.values() for r in rs}))


def _baseline(records: list[dict]) -> dict | None:
    """The row without levers (on the quiet box: the one with the default tiled Hessians)."""
    plain = [r for r in records if not levers(r)]
    return next((r for r in plain if r.get("hessian_tiles") is not False), plain[0] if plain else None)


def _name(r: dict, base: dict | None) -> str:
    if levers(r):
        return " + ".join(levers(r))
    if base is None or r is base:
        return "none (sequential HPTQ, act order)"
    if r.get("hessian_tiles") is False:
        return "none, plain (untiled) XᵀX Hessians"
    return "none (sequential HPTQ, act order), another run"


def report() -> str:
    by_budget = rows()
    lines = [BEGIN, "Generated by `benchmarks/frontier_p1.py` from `benchmarks/results/p1/`."
             " Times are wall seconds of `quant_seconds` (the allocation's float-model pass, "
             "calibration, quantization, tuning) on the shared 2-core box "
             "(threads and load as listed; rows run while other jobs were paused in quiet "
             "windows include the pauses), so compare them only between rows of similar load.",
             ""]
    for budget in sorted(by_budget):
        lines += table(budget, by_budget[budget])
    quiet = rows(QUIET_RUNS) if QUIET_RUNS.is_dir() else {}
    if quiet:
        lines += ["The same rows rerun one after another on a quiet box (nothing else running, "
                  f"{_threads(quiet)} threads, from `benchmarks/results/p1_quiet/`): these times "
                  "compare. *PPL per extra minute* = perplexity below the baseline per minute "
                  "of calibrate + quantize above it.", ""]
        for budget in sorted(quiet):
            lines += table(budget, quiet[budget], quiet=True)
    return "\n".join(lines + [END])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--write", action="store_true",
                   help="replace the frontier_p1 block of BENCHMARKS.md (or append it)")
    args = p.parse_args(argv)
    text = report()
    print(text)
    if args.write:
        doc = BENCHMARKS.read_text()
        if BEGIN in doc:
            i, j = doc.index(BEGIN), doc.index(END) + len(END)
            doc = doc[:i] + text + doc[j:]
        else:
            doc = doc.rstrip("\n") + "\n\n## Accuracy frontier at P1, one table per budget " \
                "(issue 21 item 6)\n\n" + text + "\n"
        BENCHMARKS.write_text(doc)


if __name__ == "__main__":
    main(sys.argv[1:])
