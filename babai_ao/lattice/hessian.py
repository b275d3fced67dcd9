"""Layer-input Hessians ``H = XᵀX``: streaming accumulation, damping, dead columns.

``H`` is symmetric, so with ``tiles > 1`` an accumulator computes only the tiles on and above
the diagonal, ``H[I, J] += X[:, I]ᵀ X[:, J]`` for tile ranges ``I ≤ J``, and copies each
off-diagonal tile to its mirror ``H[J, I] = H[I, J]ᵀ``: ``(n+1)/(2n)`` of the products for
``n`` tiles (measured on one CPU thread: 0.64 of the time of one ``xᵀx`` for ``K = 1536``,
0.71 for ``K = 576``, 3 tiles each). The sums are the same up to float rounding (each tile's
products are reduced in their own order), so codes may differ in rare ties from an
untiled sum. Tiling is the default of every accumulator (``tiles=None``: ``hessian_tiles(K)``
while ``tiling(True)``, the process default); ``with tiling(False):`` restores the plain
``xᵀx`` products (``quantize_model(hessian_tiles=False)``, ``--no-hessian-tiles``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from babai_ao.errors import BabaiError


@dataclass
class HessianAccumulator:
    """Streams ``H += XᵀX`` over batches of layer inputs ``x[..., K]``; counts tokens.

    Each ``add`` forms the batch's own Gram matrix ``P_b = X_bᵀX_b`` first and then adds it,
    so ``H = (…((0 + P_1) + P_2) + …)``: a fixed sequence of additions of per-batch partials
    that a run split over processes reproduces bit for bit
    (``babai_ao.calibration.distributed``), which an in-place ``addmm_`` would not.
    """

    in_features: int
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"
    tiles: int | None = None  # > 1: only the tiles on and above the diagonal are computed
    hessian: torch.Tensor = field(init=False)
    tokens: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.tiles is None:
            self.tiles = default_tiles(self.in_features)
        if self.dtype not in (torch.float32, torch.float64):
            raise BabaiError(f"Hessian dtype must be float32 or float64, got {self.dtype}")
        self.hessian = torch.zeros(self.in_features, self.in_features, dtype=self.dtype,
                                   device=self.device)

    def add(self, x: torch.Tensor) -> None:
        partial, tokens = self.batch_gram(x)
        self.hessian += partial
        self.tokens += tokens

    def batch_gram(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``(X_bᵀX_b, tokens)`` of one batch of inputs, in the accumulator's dtype."""
        if x.shape[-1] != self.in_features:
            raise BabaiError(f"input has {x.shape[-1]} features, the Hessian expects "
                             f"{self.in_features}: observe the input of the layer being quantized")
        x = x.reshape(-1, self.in_features).to(self.dtype)
        if not torch.isfinite(x).all():
            raise BabaiError("calibration activations contain NaN/Inf: check the model and "
                             "data (run the float model on the same batch)")
        if self.tiles > 1:
            partial = torch.zeros(self.in_features, self.in_features, dtype=self.dtype,
                                  device=x.device)
            add_gram_tiles_(partial, x, self.tiles)
            return partial, x.shape[0]
        return x.T @ x, x.shape[0]


_TILING = [True]  # the process default (a stack: ``tiling`` nests)


@contextmanager
def tiling(enabled: bool) -> Iterator[None]:
    """Within the block, new accumulators with ``tiles=None`` tile (``enabled``) or not."""
    _TILING.append(bool(enabled))
    try:
        yield
    finally:
        _TILING.pop()


def default_tiles(in_features: int) -> int:
    """``hessian_tiles(in_features)`` while tiling is on (the default), else 1."""
    return hessian_tiles(in_features) if _TILING[-1] else 1


def hessian_tiles(in_features: int) -> int:
    """Tiles per side for ``add_gram_tiles_``: none below 384 features, 3 up to 1536, then
    one per 512 (tiles smaller than ~200 make the products slower than they save)."""
    return 1 if in_features < 384 else max(3, math.ceil(in_features / 512))


def add_gram_tiles_(h: torch.Tensor, x: torch.Tensor, tiles: int) -> None:
    """``h += xᵀx`` for ``x [T, K]`` computing the ``tiles·(tiles+1)/2`` tiles ``I ≤ J`` and
    mirroring the rest (``h`` must be symmetric on entry, as every ``XᵀX`` sum is)."""
    k = x.shape[1]
    edges = [k * i // tiles for i in range(tiles + 1)]
    spans = list(zip(edges[:-1], edges[1:]))
    for a, (i0, i1) in enumerate(spans):
        xi = x[:, i0:i1]
        for j0, j1 in spans[a:]:
            h[i0:i1, j0:j1].addmm_(xi.T, x[:, j0:j1])
            if j0 != i0:
                h[j0:j1, i0:i1].copy_(h[i0:i1, j0:j1].T)


def validate_hessian(hessian: torch.Tensor, in_features: int) -> None:
    if hessian.shape != (in_features, in_features):
        raise BabaiError(f"Hessian has shape {tuple(hessian.shape)}, expected "
                         f"({in_features}, {in_features}) for a weight with {in_features} inputs")
    if not torch.isfinite(hessian).all():
        raise BabaiError("Hessian contains NaN/Inf: recalibrate (check activations for "
                         "overflow, accumulate in float64)")
    if not torch.allclose(hessian, hessian.T, rtol=1e-4, atol=1e-6 * hessian.diag().abs().max()):
        raise BabaiError("Hessian is not symmetric: pass H = XᵀX")


def dead_columns(hessian: torch.Tensor) -> torch.Tensor:
    """Input features never active in calibration (``H_jj = 0``): their weights can be zeroed."""
    return torch.nonzero(hessian.diag() <= 0).flatten()


def damped(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, float, torch.Tensor]:
    """``H + λI`` with ``λ = damp · mean(diag H)``; dead columns get ``H_jj = 1``.

    Returns the damped Hessian, ``λ`` and the indices of the dead columns.
    """
    if damp < 0:
        raise BabaiError(f"damp={damp} is negative: use damp >= 0 (default 0.01)")
    h = hessian.clone()
    dead = dead_columns(h)
    live = h.diag()[h.diag() > 0]
    lam = damp * float(live.mean()) if live.numel() else 0.0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1
    h.diagonal().add_(lam)
    return h, lam, dead
