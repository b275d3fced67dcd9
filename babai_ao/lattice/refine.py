"""Coordinate descent on the grid after Babai: a local search that never raises the error.

Babai's nearest plane decides each code once, against the columns after it. With every other
code held fixed, the output error ``E(q) = tr(R H Rᵀ)``, ``R = W − S(Q − Z)``, is a convex
quadratic in a single code ``q_nj``; its exact minimizer over the integers of the grid is

    q_nj ← clamp(q_nj + round(G_nj / (H_jj · s_nj))),   G = R H,

(the vertex ``r_nj − G_nj / H_jj`` rounded; a 1-D parabola's nearest integer to its vertex
is its integer minimizer, and clamping keeps it optimal on ``[0, 2^b − 1]``). Gauss–Seidel
sweeps over the columns, all rows at once, therefore give ``E_refined ≤ E_Babai`` — so the
certificate ``E ≤ B`` of an unclipped Babai pass still holds. ``G`` is kept current lazily per
block of columns (one GEMM per block), as in the nearest-plane pass; a sweep costs about one
Babai pass.
"""

from __future__ import annotations

import torch


def coordinate_descent(
    weight: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    hessian: torch.Tensor,
    maxq: int | None,
    sweeps: int = 1,
    block_size: int = 128,
) -> tuple[torch.Tensor, list[int]]:
    """Refined codes [N, K] (same dtype as ``codes``) and the number changed per sweep.

    ``scale``/``zero`` are per column ([N, K], the group values repeated); ``maxq=None``
    leaves codes unbounded (no-clipping grids). Stops early when a sweep changes nothing.
    """
    w = weight.to(hessian.dtype)
    q = codes.to(hessian.dtype).clone()
    s, z = scale.to(hessian.dtype), zero.to(hessian.dtype)
    g = (w - s * (q - z)) @ hessian  # G = R H
    hdiag = hessian.diagonal()
    n, k = w.shape
    changed: list[int] = []
    for _ in range(sweeps):
        count = 0
        for b1 in range(0, k, block_size):
            b2 = min(k, b1 + block_size)
            dr = torch.zeros(n, b2 - b1, dtype=w.dtype, device=w.device)
            for j in range(b1, b2):
                if hdiag[j] <= 0:
                    continue
                new = q[:, j] + torch.round(g[:, j] / (hdiag[j] * s[:, j]))
                if maxq is not None:
                    new.clamp_(0, maxq)
                d = s[:, j] * (q[:, j] - new)  # change of r_nj
                q[:, j] = new
                dr[:, j - b1] = d
                g[:, b1:b2].addr_(d, hessian[j, b1:b2])
                count += int(torch.count_nonzero(d))
            g[:, :b1].addmm_(dr, hessian[b1:b2, :b1])
            g[:, b2:].addmm_(dr, hessian[b1:b2, b2:])
        changed.append(count)
        if count == 0:
            break
    return q.to(codes.dtype), changed
