"""Per-layer output error of K-best vs Babai at equal measured bits (SmolLM2-135M layers).

Observe-mode Hessians of the first ``--blocks`` decoder blocks from ``--calib-n`` P1
calibration windows; every linear of those blocks quantized as HPTQ at ``--bits`` (the rate
search hits the target for both searches, so the bits are measured, not assumed) and on the
clipped 4-bit g64 grid, each with Babai and with K-best (``--k`` survivors, 3 children),
in act and min-pivot order. Records E (certificate, damped H), stored bits and wall
seconds per layer; prints the E ratios.

    .venv/bin/python benchmarks/kbest_layers.py --out benchmarks/results/kbest_layers.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import torch

from babai_ao.calibration.data import calibration_windows
from babai_ao.calibration.models import load_smollm2
from babai_ao.calibration.sequential import layer_hessians
from babai_ao.formats import hptq
from babai_ao.lattice.quantize import quantize_weight


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--calib-n", type=int, default=32)
    p.add_argument("--bits", type=float, nargs="+", default=[3.3, 4.3])
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2(num_layers=args.blocks)
    cal = calibration_windows(tok, n=args.calib_n, seq_len=512)
    accs = layer_hessians(model, cal, batch_size=8)
    modules = dict(model.named_modules())
    rows = []
    for name, acc in accs.items():
        w = modules[name].weight.detach()
        for order in ("act", "min-pivot"):
            for bits in args.bits:
                for search in ("babai", "kbest"):
                    t0 = time.perf_counter()
                    hw = hptq.quantize(w, acc.hessian, bits, order=order, search=search,
                                       k=args.k)
                    rows.append({"layer": name, "format": "hptq", "target_bits": bits,
                                 "order": order, "search": search,
                                 "bits": hw.bits_per_weight, "error": hw.certificate.error,
                                 "bound": hw.certificate.bound,
                                 "seconds": time.perf_counter() - t0})
            for search in ("babai", "kbest"):
                t0 = time.perf_counter()
                qw = quantize_weight(w, acc.hessian, bits=4, group_size=64, order=order,
                                     search=search, k=args.k)
                rows.append({"layer": name, "format": "w4g64", "order": order,
                             "search": search, "bits": qw.certificate.bits_per_weight,
                             "error": qw.error, "seconds": time.perf_counter() - t0})
        print(name, flush=True)
    summary = {}
    for fmt, bits in [("hptq", b) for b in args.bits] + [("w4g64", None)]:
        for order in ("act", "min-pivot"):
            sel = [r for r in rows if r["format"] == fmt and r["order"] == order
                   and r.get("target_bits") == bits]
            b = {r["layer"]: r for r in sel if r["search"] == "babai"}
            k = {r["layer"]: r for r in sel if r["search"] == "kbest"}
            ratios = sorted(k[n]["error"] / b[n]["error"] for n in b)
            key = f"{fmt}{'' if bits is None else '@' + str(bits)} {order}"
            summary[key] = {
                "E_ratio_min": ratios[0], "E_ratio_median": ratios[len(ratios) // 2],
                "E_ratio_max": ratios[-1],
                "E_ratio_total": sum(k[n]["error"] for n in b) / sum(b[n]["error"] for n in b),
                "bits_babai": sum(b[n]["bits"] * 1 for n in b) / len(b),
                "bits_kbest": sum(k[n]["bits"] for n in b) / len(b),
                "time_ratio": sum(k[n]["seconds"] for n in b) / sum(b[n]["seconds"] for n in b)}
            print(key, {a: round(v, 4) for a, v in summary[key].items()}, flush=True)
    Path(args.out).write_text(json.dumps({
        "command": "python benchmarks/kbest_layers.py " + " ".join(argv or []),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "load_average": os.getloadavg(), "threads": args.threads, "k": args.k,
        "blocks": args.blocks, "calib_n": args.calib_n, "summary": summary, "rows": rows},
        indent=1))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
