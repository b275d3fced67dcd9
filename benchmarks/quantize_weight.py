"""Wall time of ``babai_ao.quantize_weight`` versus a textbook GPTQ loop, side by side.

torchao's own GPTQ (``torchao.prototype.gptq.gptq_quantize``) asserts
``device.type == "cuda"`` in torchao 0.18, so on this CPU the comparison is the textbook
GPTQ loop: one column at a time, each column's error pushed at once into every later
column (no lazy blocks), the same grid and the same ``U`` (upper Cholesky of ``H⁻¹``).

    python benchmarks/quantize_weight.py [--shapes 4096x4096 11008x4096] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import torch

from babai_ao import quantize_weight
from babai_ao.lattice.grid import Grid, dequantize
from babai_ao.lattice.hessian import damped
from babai_ao.lattice.ldl import inverse_cholesky


def textbook_gptq(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int,
                  damp: float = 0.01) -> torch.Tensor:
    """GPTQ without lazy batching (natural order, lazy per-group grid). Returns Q."""
    grid = Grid(bits=bits)
    h, _, dead = damped(h, damp)
    w = w.clone()
    w[:, dead] = 0
    u = inverse_cholesky(h)
    n, k = w.shape
    codes = torch.empty_like(w)
    scale = torch.empty(n, k // group_size)
    zero = torch.empty_like(scale)
    for j in range(k):
        g = j // group_size
        if j % group_size == 0:
            scale[:, g], zero[:, g] = grid.fit(w[:, j : j + group_size])
        q = grid.round(w[:, j], scale[:, g], zero[:, g])
        codes[:, j] = q
        e = (w[:, j] - scale[:, g] * (q - zero[:, g])) / u[j, j]
        w[:, j + 1 :] -= e[:, None] * u[j, j + 1 :][None, :]
    return dequantize(codes, scale, zero, group_size)


def output_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    d = (w - q).double()
    return float(((d @ h.double()) * d).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096"])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {datetime.date.today()} {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {args.threads} threads, {args.bits}-bit g{args.group_size}")
    print("| shape N×K | babai_ao.quantize_weight (s) | textbook GPTQ loop (s) | speed-up "
          "| error ours | error textbook |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes:
        n, k = map(int, shape.split("x"))
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(n, k, generator=gen) * 0.02
        x = torch.randn(2 * k, k, generator=gen)
        h = x.T @ x
        t0 = time.perf_counter()
        ours = quantize_weight(w, h, bits=args.bits, group_size=args.group_size)
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = textbook_gptq(w, h, args.bits, args.group_size)
        t_ref = time.perf_counter() - t0
        hd, _, _ = damped(h, 0.01)
        e_ours, e_ref = output_error(w, ours.dequantize(), hd), output_error(w, ref, hd)
        print(f"| {n}×{k} | {t_ours:.1f} | {t_ref:.1f} | {t_ref / t_ours:.1f}× "
              f"| {e_ours:.4g} | {e_ref:.4g} |", flush=True)


if __name__ == "__main__":
    main()
