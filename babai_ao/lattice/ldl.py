"""Quantization orders and LDL pivots of a Hessian.

Quantizing columns in order ``p`` is Babai's nearest plane on the reversed basis, and the
step-``j`` pivot is ``d_j = 1 / [(H_{rem})⁻¹]_{jj}`` where ``H_rem`` is ``H`` restricted to the
columns not yet quantized (``j`` and later). With ``U`` the upper Cholesky factor of
``(P H Pᵀ)⁻¹`` this is ``d_j = 1 / U_jj²`` — GPTQ's divisor. ``∏ d_j = det H`` for every order,
but ``Σ d_j`` (``tr D``) and the error bound ``¼ Σ d_j s_j²`` depend on it.

Orders:
- ``natural``: ``0, 1, …, K−1``.
- ``act``: descending ``diag H`` (GPTQ's act-order).
- ``min-pivot``: pivoted LDL that eliminates, at each step, the remaining index with the
  smallest current Schur-complement diagonal; columns are quantized in the reverse of that
  elimination order (the last quantized column's pivot is its own ``H_jj``). ``act`` is its
  unpivoted approximation: it ranks by the original diagonal only.
"""

from __future__ import annotations

import torch

from babai_ao.errors import BabaiError

ORDERS = ("natural", "act", "min-pivot")


def min_pivot_order(h: torch.Tensor) -> torch.Tensor:
    """Quantization order from a pivoted LDL that eliminates the smallest pivot first.

    Left-looking: after ``i`` steps with Cholesky rows ``L[:i]``, the Schur-complement
    diagonal is ``d = diag H − Σ L[:i]²``; step ``i`` eliminates ``j = argmin d`` over the
    remaining indices and appends ``L[i] = (H_j − L[:i, j]ᵀ L[:i]) / √d_j``.
    """
    k = h.shape[0]
    d = h.diagonal().clone()
    rows = torch.zeros(k, k, dtype=h.dtype, device=h.device)
    eliminated = torch.zeros(k, dtype=torch.bool, device=h.device)
    order = torch.empty(k, dtype=torch.int64, device=h.device)
    for i in range(k):
        j = int(torch.argmin(d.masked_fill(eliminated, float("inf"))))
        piv = d[j]
        if piv <= 0:
            raise BabaiError("Hessian is not positive definite (non-positive pivot in LDL): "
                             "raise damp (e.g. damp=0.1) or calibrate on more tokens")
        row = h[j] - rows[:i, j] @ rows[:i] if i else h[j].clone()
        rows[i] = row / piv.sqrt()
        d -= rows[i].square()
        eliminated[j] = True
        order[i] = j
    return order.flip(0)


def quantization_order(h: torch.Tensor, order: str) -> torch.Tensor:
    """Permutation ``p``: the j-th column quantized is original column ``p[j]``."""
    if order == "natural":
        return torch.arange(h.shape[0], device=h.device)
    if order == "act":
        return torch.argsort(h.diagonal(), descending=True, stable=True)
    if order == "min-pivot":
        return min_pivot_order(h)
    raise BabaiError(f"unknown order {order!r}: choose one of {ORDERS}")


def inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper ``U`` with ``H⁻¹ = UᵀU`` (GPTQ's factor), without forming ``H⁻¹``.

    With ``J`` the reversal and ``JHJ = LLᵀ``, ``H = VVᵀ`` for the upper ``V = JLJ``, so
    ``U = V⁻¹ = J L⁻¹ J``: one Cholesky and one triangular solve.
    """
    lower, info = torch.linalg.cholesky_ex(h.flip(0, 1))
    if int(info) != 0:
        raise BabaiError(
            f"Hessian is not positive definite (Cholesky failed at column "
            f"{h.shape[0] - int(info)}): use damp > 0 (default 0.01; try 0.1), calibrate on "
            "more tokens than input features, or accumulate in float64")
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1)


def pivots(h: torch.Tensor) -> torch.Tensor:
    """LDL pivots ``d_j = 1/U_jj²`` of ``h`` (already permuted to quantization order)."""
    return inverse_cholesky(h).diagonal().pow(-2)
