"""K-best (beam) nearest plane: a breadth-first search on Babai's triangular recursion.

Babai's nearest plane decides code ``j`` by rounding the error-updated value ``w̃_j`` and
never revisits it. Along *any* sequence of codes the output error splits over the steps,

    ‖X(w − q)‖² = Σ_j d_j r_j²,   r_j = w̃_j − s_j (q_j − z_j),   d_j = 1 / U_jj²,

with ``w̃_j = w_j − Σ_{i<j} (r_i / U_ii) U_ij`` fed by the codes chosen before ``j`` on that
path. K-best keeps, for each row, the ``k`` partial paths with the smallest partial error
``Σ_{i≤j} d_i r_i²``; at step ``j`` every survivor branches into ``children`` codes
``round(t_j) + {−h … h}`` (``t_j = w̃_j / s_j + z_j``, ``children = 2h + 1``; on a clipped grid
the centre is clamped to ``[0, maxq]`` and children outside it are dropped, so the box is part
of the search), and the ``k`` best of the ``k · children`` continue. ``k = 1, children = 1`` is
Babai. The final partial error of a path is its exact output error (damped ``H``).

Rows are independent lattice problems sharing ``U``, so all rows advance together: beams are
``[rows, k]``, candidates ``[rows, k · children]``, one ``topk`` per step. Each survivor owns
its error-updated future columns; inside a block of columns those are gathered along the
parent pointers and updated in place (``[rows, k, block]``), and the columns after the block
get one batched GEMM per block, ``[rows · k, block] @ U[block, rest]``, with every final
survivor's in-block errors recovered by walking its parent pointers back. The chosen path
is recovered the same way at the end. ``keep_better`` makes the result never worse than
Babai, row by row.
"""

from __future__ import annotations

import torch

from babai_ao.errors import BabaiError


def kbest_nearest_plane(
    weight: torch.Tensor,
    upper: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    maxq: int | None,
    k: int = 16,
    children: int = 3,
    block_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K-best codes for every row of ``weight`` [N, K] (columns in quantization order).

    ``upper``: upper Cholesky factor of ``H⁻¹`` (same order); ``scale``/``zero`` [N, K]: the
    grid of every (row, column), static; ``maxq``: clamp range ``[0, maxq]`` or ``None``
    (unbounded codes). Returns codes (float tensor of integers), residuals ``r`` [N, K] of
    the best path of each row, and that path's error ``Σ_j d_j r_j²`` per row [N].
    """
    if k < 1 or children < 1 or children % 2 == 0:
        raise BabaiError(f"k={k}, children={children}: use k >= 1 survivors and an odd "
                         "number of children >= 1 (3 = nearest code and both neighbours)")
    n, cols = weight.shape
    dt = weight.dtype
    dev = weight.device
    half = children // 2
    offsets = torch.arange(-half, half + 1, dtype=dt, device=dev)
    d = upper.diagonal().pow(-2)
    inv_diag = upper.diagonal().reciprocal()
    inf = torch.tensor(float("inf"), dtype=dt, device=dev)
    metric = torch.full((n, k), float("inf"), dtype=dt, device=dev)
    metric[:, 0] = 0  # one live path at the start; the others fill in as it branches
    parent_dtype = torch.uint8 if k <= 255 else torch.int32
    parents = torch.empty(cols, n, k, dtype=parent_dtype, device=dev)
    codes_h = torch.empty(cols, n, k, dtype=dt, device=dev)
    resid_h = torch.empty(cols, n, k, dtype=dt, device=dev)
    slots = torch.arange(k, device=dev).expand(n, k)
    row_base = (torch.arange(n, device=dev) * k)[:, None]  # flat index of (row, slot 0)
    tail = weight[:, None, :].expand(n, k, cols)  # survivors' future columns (from i1 on)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        blk = tail[:, :, : i2 - i1].contiguous()  # columns j … i2−1, current survivors
        anc = slots.clone()  # each survivor's slot at the start of the block
        errs = torch.empty(i2 - i1, n, k, dtype=dt, device=dev)
        for j in range(i1, i2):
            s, z = scale[:, j, None], zero[:, j, None]  # [N, 1]
            x = blk[:, :, 0]
            centre = torch.round(x / s + z)
            if maxq is not None:
                centre.clamp_(0, maxq)
            cand = centre[..., None] + offsets  # [N, k, children]
            r = x[..., None] - s[..., None] * (cand - z[..., None])
            cost = metric[..., None] + d[j] * r * r
            if maxq is not None and children > 1:
                cost = torch.where((cand < 0) | (cand > maxq), inf, cost)
            metric, idx = torch.topk(cost.reshape(n, -1), k, dim=1, largest=False,
                                     sorted=False)
            parent = torch.div(idx, children, rounding_mode="floor")
            codes_h[j] = cand.reshape(n, -1).gather(1, idx)
            rj = r.reshape(n, -1).gather(1, idx)
            resid_h[j] = rj
            parents[j] = parent.to(parent_dtype)
            e = rj * inv_diag[j]
            errs[j - i1] = e
            anc = anc.gather(1, parent)
            if j + 1 < i2:  # survivors take their parents' future columns (row copies)
                rest = blk[:, :, 1:].reshape(n * k, -1)
                blk = rest.index_select(0, (row_base + parent).reshape(-1)).reshape(n, k, -1)
                blk.sub_(e[..., None] * upper[j, j + 1 : i2])
        if i2 == cols:
            break
        # every current survivor's errors inside the block, along its parent pointers
        block_err = torch.empty(n, k, i2 - i1, dtype=dt, device=dev)
        cur = slots
        for j in range(i2 - 1, i1 - 1, -1):
            block_err[:, :, j - i1] = errs[j - i1].gather(1, cur)
            cur = parents[j].long().gather(1, cur)
        rest = tail[:, :, i2 - i1 :]
        if i1 == 0:  # all survivors still share the row's original columns
            tail = rest[:, :1].expand(n, k, -1).reshape(n * k, -1)
        else:
            tail = rest.reshape(n * k, -1).index_select(0, (row_base + anc).reshape(-1))
        tail = tail.addmm_(block_err.reshape(n * k, -1), upper[i1:i2, i2:],
                           alpha=-1.0).reshape(n, k, -1)
    best = metric.argmin(dim=1, keepdim=True)  # [N, 1]
    row_error = metric.gather(1, best).squeeze(1)
    codes = torch.empty(n, cols, dtype=dt, device=dev)
    resid = torch.empty(n, cols, dtype=dt, device=dev)
    cur = best
    for j in range(cols - 1, -1, -1):
        codes[:, j] = codes_h[j].gather(1, cur).squeeze(1)
        resid[:, j] = resid_h[j].gather(1, cur).squeeze(1)
        cur = parents[j].long().gather(1, cur)
    return codes, resid, row_error


def keep_better(codes: torch.Tensor, resid: torch.Tensor, row_error: torch.Tensor,
                other_codes: torch.Tensor, other_resid: torch.Tensor,
                other_error: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row by row, the codes with the smaller error (ties keep ``other``): ``[N, K]`` codes,
    residuals and the ``[N]`` errors of the rows kept."""
    take = (row_error < other_error)[:, None]
    return (torch.where(take, codes, other_codes), torch.where(take, resid, other_resid),
            torch.minimum(row_error, other_error))
