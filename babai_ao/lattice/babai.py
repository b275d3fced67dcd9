"""Babai's nearest-plane algorithm, in two independent forms.

1. ``nearest_plane`` — the GPTQ form, for a whole weight matrix at once. Rows of ``W`` are
   independent closest-vector problems on one lattice with Gram matrix ``H``. With ``U`` the
   upper Cholesky factor of ``H⁻¹`` (columns in quantization order), step ``j`` rounds the
   error-updated column ``w̃_j`` to its grid, ``r_j = w̃_j − s_j(q_j − z_j)``, and pushes
   ``e_j = r_j / U_jj`` onto the later columns: ``w̃_{>j} −= e_j · U_{j,>j}``. Updates are
   applied lazily per block of columns (one GEMM per block). The output error is
   ``‖X(w − q)‖² = Σ_j d_j r_j²`` with ``d_j = 1/U_jj²``.

2. ``babai_nearest_plane`` — the textbook algorithm on an explicit basis ``B`` (columns are
   basis vectors): ``B = QR``, ``y = Qᵀt``, and for ``i = n−1 … 0``:
   ``c_i = round((y_i − Σ_{k>i} R_ik c_k) / R_ii)``. Feeding it the basis of the same lattice
   in reversed quantization order gives GPTQ's codes exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .grid import Grid

# (column j in quantization order, current values of the rest of j's group) -> (scale, zero)
GridAt = Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def nearest_plane(
    weight: torch.Tensor,
    upper: torch.Tensor,
    grid: Grid,
    grid_at: GridAt,
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize every row of ``weight`` [N, K] (columns in quantization order).

    ``upper`` is the upper Cholesky factor of ``H⁻¹`` in the same order. ``grid_at(j, rest)``
    returns the per-row scale and zero for column ``j``; ``rest`` [k', N] holds the current
    (error-updated) values of columns ``j … end of block``, transposed, for grids fixed lazily.
    Returns the integer codes (float tensor) and the rounding residuals ``r``, both [N, K].
    """
    wt = weight.T.contiguous()  # column j is the contiguous row wt[j]
    k = wt.shape[0]
    codes = torch.empty_like(wt)
    resid = torch.empty_like(wt)
    err = torch.empty_like(wt)
    inv_diag = upper.diagonal().reciprocal()
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        for j in range(i1, i2):
            scale, zero = grid_at(j, wt[j:i2])
            q = grid.round(wt[j], scale, zero)
            r = wt[j] - scale * (q - zero)
            codes[j] = q
            resid[j] = r
            torch.mul(r, inv_diag[j], out=err[j])
            wt[j + 1 : i2].addr_(upper[j, j + 1 : i2], err[j], alpha=-1.0)
        wt[i2:].addmm_(upper[i1:i2, i2:].T, err[i1:i2], alpha=-1.0)
    return codes.T, resid.T


def babai_nearest_plane(
    basis: torch.Tensor,
    target: torch.Tensor,
    lower: torch.Tensor | None = None,
    upper: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integer coefficients ``c`` with ``B c`` near ``t`` (Babai's nearest plane, textbook).

    ``basis`` [m, n] holds the basis vectors as columns; ``target`` is [m] or [batch, m].
    The last basis vector is decided first. Optional per-coefficient ``lower``/``upper``
    bounds clamp each ``c_i`` as it is decided (clipped Babai). Returns int64 [n] / [batch, n].
    """
    q, r = torch.linalg.qr(basis)
    y = target @ q  # Qᵀt for each target row
    squeeze = y.dim() == 1
    y = y.reshape(-1, basis.shape[1]).clone()
    n = basis.shape[1]
    c = torch.empty_like(y)
    for i in range(n - 1, -1, -1):
        ci = torch.round(y[:, i] / r[i, i])
        if lower is not None:
            ci = torch.maximum(ci, lower[..., i].to(ci))
        if upper is not None:
            ci = torch.minimum(ci, upper[..., i].to(ci))
        c[:, i] = ci
        y[:, : i + 1] -= ci[:, None] * r[: i + 1, i]
    c = c.to(torch.int64)
    return c[0] if squeeze else c
