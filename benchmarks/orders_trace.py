"""tr(D) of natural, act and min-pivot order on the real Hessians of SmolLM2-135M (issue 2).

Hessians of every decoder linear from the float model (one forward per batch of calibration
windows of wiki.valid.tokens, seed 0), damped by 0.01·mean(diag H); per layer
``tr(D) = Σ_j d_j`` (LDL pivots in quantization order), and with ``clip=False`` the 4-bit g64
act-order error E against Babai's bound B. Writes the section
``## Orders on real Hessians (tr D)`` of BENCHMARKS.md with ``--write``.

    python benchmarks/orders_trace.py [--windows 4] [--seq-len 256] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import torch

from babai_ao import quantize_weight
from babai_ao.calibration.data import calibration_windows
from babai_ao.calibration.models import load_smollm2
from babai_ao.calibration.sequential import layer_hessians
from babai_ao.lattice.hessian import damped
from babai_ao.lattice.ldl import ORDERS, pivots, quantization_order

sys.path.insert(0, str(Path(__file__).resolve().parent))
from p1_table import write_section  # noqa: E402

HEADING = "## Orders on real Hessians (tr D)"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = load_smollm2()
    accs = layer_hessians(model, calibration_windows(tok, n=args.windows, seq_len=args.seq_len))
    weights = {n: m.weight.detach() for n, m in model.named_modules() if n in accs}
    rows, cache = [], {}
    for name, acc in accs.items():
        if id(acc) not in cache:
            h = damped(acc.hessian, 0.01)[0]
            cache[id(acc)] = {o: float(pivots(h[q][:, q]).sum())
                              for o in ORDERS for q in [quantization_order(h, o)]}
        qw = quantize_weight(weights[name], acc.hessian, bits=4, group_size=64, order="act",
                             clip=False)
        rows.append((name, cache[id(acc)], qw.certificate))
    total = {o: sum(t[o] for t in cache.values()) for o in ORDERS}
    worse = [n for n, t, _ in rows if t["min-pivot"] >= t["act"]]
    holds = sum(c.clipped == 0 and c.error <= c.bound for _, _, c in rows)
    lines = [
        HEADING, "",
        f"SmolLM2-135M-Instruct fp32, Hessians of all {len(rows)} decoder linears from "
        f"{args.windows} × {args.seq_len} tokens of wiki.valid.tokens (seed 0), damp 0.01; "
        f"q/k/v and gate/up share one Hessian ({len(cache)} distinct). "
        f"{datetime.date.today()}, {torch.get_num_threads()} threads on a shared "
        f"{os.cpu_count()}-core CPU, {time.perf_counter() - t0:.0f} s in all.", "",
        f"Total tr(D) over distinct Hessians: natural {total['natural']:.6g}, "
        f"act {total['act']:.6g}, min-pivot {total['min-pivot']:.6g} "
        f"(min-pivot / act = {total['min-pivot'] / total['act']:.4f}).", "",
        "Layers where min-pivot's tr(D) is not below act's: "
        + (", ".join(worse) if worse else "none") + ".", "",
        f"No clipping (4-bit g64, act order): E ≤ B on {holds}/{len(rows)} layers.", "",
        "| layer | tr D natural | tr D act | tr D min-pivot | min-pivot/act | E (no clip) | "
        "B | E/B |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, t, c in rows:
        lines.append(f"| {name} | {t['natural']:.4g} | {t['act']:.4g} | {t['min-pivot']:.4g} | "
                     f"{t['min-pivot'] / t['act']:.3f} | {c.error:.4g} | {c.bound:.4g} | "
                     f"{c.error / c.bound:.3f} |")
    lines += ["", "    python benchmarks/orders_trace.py "
              f"--windows {args.windows} --seq-len {args.seq_len} --write BENCHMARKS.md", ""]
    section = "\n".join(lines)
    print(section)
    if args.write:
        write_section(args.write, section, HEADING)


if __name__ == "__main__":
    main()
