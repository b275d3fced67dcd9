"""One Lagrange multiplier for the whole model: each layer's step from a shared λ.

With entropy-coded, unclipped codes every layer ``l`` can take any step ``s_l``; its stored
bits ``R_l(s)`` (``n_l`` weights × bits per weight) fall and its output error ``E_l(s)`` rises
with ``s``. The model's loss grows by about ``Σ_l w_l E_l(s_l)``, with ``w_l`` the sensitivity
of the loss to layer ``l``'s output error (a Fisher estimate: ``babai_ao.calibration
.allocation``). Minimizing it at an average rate of ``b`` bits per weight,

    min_s  Σ_l w_l E_l(s_l)   subject to   Σ_l n_l R_l(s_l) ≤ b · Σ_l n_l,

is solved by one ``λ ≥ 0``: every layer independently minimizes ``w_l E_l(s) + λ n_l R_l(s)``
over its candidate steps, which makes the marginal loss decrease per stored bit equal across
layers, and ``λ`` is bisected until the average rate meets the budget. The solution for a
``λ`` is optimal among all choices with at most its own rate (the Lagrangian sufficiency
theorem; the brute-force test checks exactly this).

For unclipped Babai the certificate gives the error's shape: residuals are about uniform on
``[−s/2, s/2]``, so ``E_l(s) ≈ s² · rows · tr(D)/12`` (``model_error``; the high-rate optimum is
then ``s_l² ∝ λ · in_features / (w_l tr D_l)``). The allocator itself takes measured curves:
``bits`` and ``error`` at a few steps per layer (``RateCurve``), interpolated on a fine grid of
``log2 s`` — bits linearly, ``log E`` linearly (``E ∝ s²`` at high rate).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from babai_ao.errors import BabaiError

FINE_STEPS_PER_OCTAVE = 64


@dataclass
class RateCurve:
    """One layer's measured rate and error at a few steps (ascending ``log2_steps``)."""

    name: str
    numel: int  # weights n_l
    sensitivity: float  # w_l: loss increase per unit of output error E_l
    log2_steps: torch.Tensor  # [m] ascending
    bits: torch.Tensor  # [m] stored bits per weight at each step (non-increasing)
    error: torch.Tensor  # [m] output error E_l at each step (non-decreasing)

    def __post_init__(self) -> None:
        m = self.log2_steps.numel()
        if m < 1 or self.bits.shape != (m,) or self.error.shape != (m,):
            raise BabaiError(f"{self.name}: log2_steps, bits and error must be 1-D of one "
                             "length (a measured point per step)")
        if m > 1 and not bool((self.log2_steps.diff() > 0).all()):
            raise BabaiError(f"{self.name}: log2_steps must be strictly ascending")
        if not (self.sensitivity >= 0 and math.isfinite(self.sensitivity)):
            raise BabaiError(f"{self.name}: sensitivity {self.sensitivity} must be finite "
                             "and >= 0")
        if not bool((self.error > 0).all()):
            raise BabaiError(f"{self.name}: errors must be positive (log-interpolated)")

    def fine(self, per_octave: int = FINE_STEPS_PER_OCTAVE) -> RateCurve:
        """The curve on a grid of ``per_octave`` steps per doubling of ``s`` (same range)."""
        lo, hi = float(self.log2_steps[0]), float(self.log2_steps[-1])
        count = max(2, int(round((hi - lo) * per_octave)) + 1) if hi > lo else 1
        x = torch.linspace(lo, hi, count, dtype=torch.float64)
        xs = self.log2_steps.to(torch.float64)
        bits = _interp(x, xs, self.bits.to(torch.float64))
        error = _interp(x, xs, self.error.to(torch.float64).log()).exp()
        return RateCurve(self.name, self.numel, self.sensitivity, x, bits, error)


def _interp(x: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of ``(xs, ys)`` at ``x`` (inside ``[xs₀, xs₋₁]``)."""
    if xs.numel() == 1:
        return ys.expand_as(x).clone()
    i = torch.searchsorted(xs, x, right=True).clamp(1, xs.numel() - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    t = ((x - x0) / (x1 - x0)).clamp(0, 1)
    return y0 + t * (y1 - y0)


def model_error(step: float, rows: int, trace_d: float) -> float:
    """The certificate's high-rate error model ``s² · rows · tr(D) / 12`` (uniform residuals)."""
    return step * step * rows * trace_d / 12


@dataclass
class Allocation:
    """The chosen step index of every layer for one ``λ``, with its totals."""

    lam: float
    choice: list[int]  # index into each curve's points
    avg_bits: float  # Σ n_l R_l / Σ n_l
    loss: float  # Σ w_l E_l

    def bits(self, curves: Sequence[RateCurve]) -> list[float]:
        return [float(c.bits[i]) for c, i in zip(curves, self.choice)]

    def log2_steps(self, curves: Sequence[RateCurve]) -> list[float]:
        return [float(c.log2_steps[i]) for c, i in zip(curves, self.choice)]


def choose(curves: Sequence[RateCurve], lam: float) -> Allocation:
    """Every layer's minimizer of ``w_l E_l + λ n_l R_l`` (ties: the lower rate)."""
    choice, total_bits, total_n, loss = [], 0.0, 0, 0.0
    for c in curves:
        cost = c.sensitivity * c.error.double() + lam * c.numel * c.bits.double()
        best = cost.min()
        tied = torch.nonzero(cost <= best + 1e-12 * best.abs()).flatten()
        i = int(tied[c.bits[tied].argmin()])
        choice.append(i)
        total_bits += c.numel * float(c.bits[i])
        total_n += c.numel
        loss += c.sensitivity * float(c.error[i])
    return Allocation(lam, choice, total_bits / total_n, loss)


def allocate(curves: Sequence[RateCurve], budget_bits: float, iters: int = 200
             ) -> Allocation:
    """The allocation of the smallest ``λ`` whose average rate is within ``budget_bits``
    (bisection in ``log λ``). Raises when even every layer's coarsest step exceeds it."""
    if not curves:
        raise BabaiError("no layers to allocate bits to")
    coarsest = _extreme(curves, coarse=True)
    if coarsest.avg_bits > budget_bits + 1e-9:
        raise BabaiError(f"budget {budget_bits} bits/weight is below the coarsest measured "
                         f"steps ({coarsest.avg_bits:.3f}): measure larger steps or raise "
                         "the budget")
    if choose(curves, 0.0).avg_bits <= budget_bits:
        return choose(curves, 0.0)  # the finest steps already fit
    # a natural scale for λ: loss per stored bit at the middle points, then bracket by ×4
    typical = [c.sensitivity * float(c.error[c.error.numel() // 2])
               / (c.numel * max(float(c.bits[c.bits.numel() // 2]), 1e-12)) for c in curves]
    hi = max(sorted(typical)[len(typical) // 2], 1e-300)
    lo = hi
    while choose(curves, hi).avg_bits > budget_bits:
        hi *= 4
        if hi > 1e300:
            return coarsest
    while lo > 1e-300 and choose(curves, lo).avg_bits <= budget_bits:
        lo /= 4
    for _ in range(iters):
        if hi / lo < 1 + 1e-12:
            break
        mid = math.sqrt(lo * hi)
        if choose(curves, mid).avg_bits > budget_bits:
            lo = mid
        else:
            hi = mid
    return choose(curves, hi)


def _extreme(curves: Sequence[RateCurve], coarse: bool) -> Allocation:
    """Every layer at its lowest-rate (``coarse``) or highest-rate point."""
    choice = [int(c.bits.argmin() if coarse else c.bits.argmax()) for c in curves]
    n = sum(c.numel for c in curves)
    avg = sum(c.numel * float(c.bits[i]) for c, i in zip(curves, choice)) / n
    loss = sum(c.sensitivity * float(c.error[i]) for c, i in zip(curves, choice))
    return Allocation(float("inf") if coarse else 0.0, choice, avg, loss)
