"""Hitting a target value of a decreasing function of one parameter (a rate search).

Both no-clipping formats tune one number (SSQR's scale multiplier, HPTQ's scale) so that a
decreasing measure (bits per weight, outlier density) hits a target. Each evaluation is a
full nearest-plane pass, so the search must use few of them: a secant step from the initial
guess (with a caller's slope guess), secant expansion until the target is bracketed, then
Illinois regula falsi inside the bracket (superlinear, never leaves the bracket).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from babai_ao.errors import BabaiError

T = TypeVar("T")


@dataclass
class SearchResult(Generic[T]):
    x: float
    value: float
    payload: T
    evaluations: int


def solve_decreasing(
    f: Callable[[float], tuple[float, T]],
    target: float,
    x0: float,
    slope: float,
    tol: float,
    lo: float,
    hi: float,
    max_evals: int = 40,
    what: str = "target",
) -> SearchResult[T]:
    """``x`` in ``[lo, hi]`` with ``|f(x) − target| ≤ tol`` for ``f`` decreasing in ``x``.

    ``f`` returns ``(value, payload)``; ``slope < 0`` guesses ``df/dx`` for the first step.
    If the target is not reached within ``max_evals`` the closest point seen is returned.
    """
    if slope >= 0:
        raise BabaiError("slope guess must be negative for a decreasing function")
    evals = 0
    seen: list[tuple[float, float, T]] = []

    def ev(x: float) -> tuple[float, float]:
        nonlocal evals
        evals += 1
        v, p = f(x)
        seen.append((x, v, p))
        return v - target, v

    def best() -> SearchResult[T]:
        x, v, p = min(seen, key=lambda e: abs(e[1] - target))
        return SearchResult(x, v, p, evals)

    x_a = min(max(x0, lo), hi)
    g_a, _ = ev(x_a)
    if abs(g_a) <= tol:
        return best()
    # Expand (secant steps, growing) until the sign of g changes.
    step = -g_a / slope
    x_b, g_b = x_a, g_a
    while (g_a > 0) == (g_b > 0):
        x_a, g_a = x_b, g_b
        x_b = min(max(x_a + step, lo), hi)
        if x_b == x_a:
            side = "raise" if g_a > 0 else "lower"
            raise BabaiError(f"{what} {target} is out of reach on [{lo:g}, {hi:g}] (closest "
                             f"{g_a + target:.4f}): {side} the {what}")
        g_b, _ = ev(x_b)
        if abs(g_b) <= tol:
            return best()
        if evals >= max_evals:
            return best()
        if (g_a > 0) == (g_b > 0):
            secant = -g_b * (x_b - x_a) / (g_b - g_a) if g_b != g_a else step
            step = secant if abs(secant) > abs(step) and secant * step > 0 else 2 * step
    # Illinois regula falsi on the bracket [x_a, x_b] (g_a and g_b of opposite signs).
    while evals < max_evals and abs(x_b - x_a) > 1e-12 * max(1.0, abs(x_a)):
        x_c = x_b - g_b * (x_b - x_a) / (g_b - g_a)
        g_c, _ = ev(x_c)
        if abs(g_c) <= tol:
            break
        if (g_c > 0) != (g_b > 0):
            x_a, g_a = x_b, g_b
        else:
            g_a /= 2  # the retained end would stall: halve its weight
        x_b, g_b = x_c, g_c
    return best()
