"""Importance-weighted grids for GGUF blocks: where Babai's codes will live, chosen by H.

``fit_q4_k`` and the Q5_0 min-max grid take each sub-block's range from its extreme values,
so one outlier column stretches the step of 31 others. llama.cpp's importance matrix instead
chooses each block's scale (and min) to minimize an activation-weighted rounding error
``Σᵢ aᵢ (wᵢ − ŵᵢ)²`` with ``aᵢ`` the mean squared input of column ``i``. The same weights are
on hand here for free: ``aᵢ = Hᵢᵢ + λ`` with ``H = XᵀX`` the layer's Hessian and ``λ`` the
solver's damping (``damp · mean diag H``), so a column the data never excites still counts
a little.

For every group of 32 weights, each candidate grid is scored by the weighted error of
rounding to it; candidates are the min-max grid shrunk by a set of factors, each followed by
one weighted least-squares refit of its parameters to the codes it produced:

* Q5_0 (``ŵ = d·c``, ``c ∈ −16..15``): ``d = Σ a·w·c / Σ a·c²``.
* Q4_K sub-block (``ŵ = s·q − o``, ``q ∈ 0..15``): ``(s, −o)`` is the weighted regression
  of ``w`` on ``(q, 1)``; ``o`` is kept ``≥ 0`` (a Q4_K min is a 6-bit count of ``dmin``,
  never negative), ``s > 0``.

The winning grid is then fixed, and Babai's nearest plane chooses the codes on exactly it
(``gguf_model.quantize_block_weight(grid_fit="weighted")``): the rounding error the fit
optimizes is only a proxy for the error Babai leaves, which the certificate reports.
"""

from __future__ import annotations

import torch

from babai_ao.errors import BabaiError

from .gguf_q4k import MAX6, MAXQ, SUB, SUBS, SUPER, Q4KGrid, _fp16_positive

SHRINK = torch.linspace(0.5, 1.0, 11, dtype=torch.float64)  # min-max range × these
Q5_LO, Q5_HI = -16, 15  # Q5_0's centred codes


def importance(hessian: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Per-column weights ``a = diag H + damp · mean(diag H)`` (float64, all > 0)."""
    diag = hessian.detach().double().diagonal().clamp(min=0)
    lam = damp * float(diag.mean())
    return diag + (lam if lam > 0 else 1.0)


def _groups(weight: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = weight.shape
    if a.shape != (k,):
        raise BabaiError(f"importance has shape {tuple(a.shape)}, expected ({k},): one "
                         "weight per input column")
    w = weight.detach().double().reshape(n, k // SUB, 1, SUB)
    return w, a.double().reshape(1, k // SUB, 1, SUB).expand_as(w)


def fit_q5_0(weight: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Q5_0 scales ``d`` [N, K/32] (float32, fp16-representable, > 0) minimizing the
    ``a``-weighted rounding error of each group of 32."""
    if weight.shape[1] % SUB:
        raise BabaiError(f"Q5_0 needs in_features a multiple of {SUB}, got {weight.shape[1]}")
    w, aw = _groups(weight, a)
    base = torch.maximum(w.amin(-1, keepdim=True).neg() / -Q5_LO, w.amax(-1, keepdim=True) / Q5_HI)
    base = base.clamp(min=2.0 ** -24)
    cands = [base * SHRINK.reshape(1, 1, -1, 1)]
    c = torch.round(w / cands[0]).clamp(Q5_LO, Q5_HI)
    refit = (aw * w * c).sum(-1, keepdim=True) / (aw * c * c).sum(-1, keepdim=True).clamp(min=1e-300)
    cands.append(torch.where(refit > 0, refit, cands[0]))
    d = _fp16_positive(torch.cat(cands, dim=2)).double()
    err = (aw.expand(-1, -1, d.shape[2], -1) * (w - d * torch.round(w / d).clamp(Q5_LO, Q5_HI)) ** 2).sum(-1)
    best = err.argmin(dim=2, keepdim=True)
    return d.squeeze(-1).gather(2, best).squeeze(2).float()


def fit_q4_k_weighted(weight: torch.Tensor, a: torch.Tensor) -> Q4KGrid:
    """Q4_K grid of ``weight`` [N, K] (``K`` a multiple of 256) minimizing, sub-block by
    sub-block, the ``a``-weighted rounding error; then ``d``/``dmin`` and the 6-bit
    ``sc``/``m`` as ``fit_q4_k`` forms them."""
    n, k = weight.shape
    if k % SUPER:
        raise BabaiError(f"Q4_K needs in_features a multiple of {SUPER}, got {k}")
    w, aw = _groups(weight, a)
    lo = w.amin(-1, keepdim=True).clamp(max=0)
    hi = w.amax(-1, keepdim=True).clamp(min=0)
    f = SHRINK.reshape(1, 1, -1, 1)
    lo_c, hi_c = (lo * f).expand(-1, -1, len(SHRINK), -1), hi * f  # shrink both ends …
    lo_c = torch.cat([lo_c, lo.expand_as(lo_c), lo_c], dim=2)  # … or only one
    hi_c = torch.cat([hi_c, hi_c, hi.expand_as(hi_c)], dim=2)
    s = ((hi_c - lo_c) / MAXQ).clamp(min=2.0 ** -24)
    o = -lo_c
    q = torch.round((w + o) / s).clamp(0, MAXQ)
    sa, sq, sqq = aw.sum(-1, True), (aw * q).sum(-1, True), (aw * q * q).sum(-1, True)
    sw, sqw = (aw * w).sum(-1, True), (aw * q * w).sum(-1, True)
    det = sqq * sa - sq * sq
    ok = det > 1e-12 * sqq * sa
    s_fit = torch.where(ok, (sqw * sa - sq * sw) / det.where(ok, torch.ones_like(det)), s)
    o_fit = torch.where(ok, (sq * sqw - sqq * sw) / det.where(ok, torch.ones_like(det)), o)
    neg = o_fit < 0  # a negative min is not storable: o = 0, refit the step alone
    s_fit = torch.where(neg, sqw / sqq.clamp(min=1e-300), s_fit)
    o_fit = o_fit.clamp(min=0)
    good = s_fit > 0
    s = torch.cat([s, torch.where(good, s_fit, s)], dim=2)
    o = torch.cat([o, torch.where(good, o_fit, o)], dim=2)
    q = torch.round((w + o) / s).clamp(0, MAXQ)
    err = (aw.expand_as(q) * (w - (s * q - o)) ** 2).sum(-1)
    best = err.argmin(dim=2, keepdim=True)
    step = s.squeeze(-1).gather(2, best).reshape(n, k // SUPER, SUBS)
    off = o.squeeze(-1).gather(2, best).reshape(n, k // SUPER, SUBS)
    d = _fp16_positive(step.amax(dim=-1) / MAX6)
    dmin = _fp16_positive(off.amax(dim=-1) / MAX6)
    sc = torch.round(step / d.double()[..., None]).clamp(1, MAX6)
    m = torch.round(off / dmin.double()[..., None]).clamp(0, MAX6)
    return Q4KGrid(d, dmin, sc.long().reshape(n, -1), m.long().reshape(n, -1))
