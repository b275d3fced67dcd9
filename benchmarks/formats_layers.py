"""Layer-level companion of formats_p1: output error E = tr((W−Q) H (W−Q)ᵀ) per format at
equal measured bits, on the 14 linears of SmolLM2's first two blocks.

Hessians: observe mode on the first 16 P1 calibration windows (16 × 512 tokens).

    .venv/bin/python benchmarks/formats_layers.py        # prints a markdown table
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from formats_p1 import observe_hessians, quantize_layer  # noqa: E402

from babai_ao.calibration.data import calibration_windows  # noqa: E402
from babai_ao.calibration.models import load_smollm2  # noqa: E402

ROWS = [["babai2", "hrtn@2.281", "hptq@2.281", "ssqr2@2.5"],
        ["babai3", "hrtn@3.297", "hptq@3.297", "ssqr3@3.45"],
        ["babai4", "hrtn@4.3125", "hptq@4.3125", "ssqr4@4.45"]]


def main() -> None:
    torch.set_num_threads(1)
    model, tok = load_smollm2(num_layers=2)
    hs = observe_hessians(model, calibration_windows(tok, n=16))
    weights = {n: m.weight.detach() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}
    print("| row | bits/weight (measured) | Σ E over 14 layers | E / E(clipped Babai) | "
          "E ≤ B |\n|---|---|---|---|---|")
    for group in ROWS:
        base = None
        for row in group:
            err = nbytes = numel = 0.0
            holds = []
            for name, w in weights.items():
                deq, nb, ok = quantize_layer(row, w, hs[name])
                d = deq - w
                err += float(((d @ hs[name]) * d).sum())
                nbytes += nb
                numel += w.numel()
                holds.append(ok)
            base = err if base is None else base
            ok = "n/a (clipped)" if holds[0] is None else f"{sum(holds)}/{len(holds)}"
            print(f"| `{row}` | {8 * nbytes / numel:.3f} | {err:.4g} | {err / base:.3f} | "
                  f"{ok} |", flush=True)


if __name__ == "__main__":
    main()
