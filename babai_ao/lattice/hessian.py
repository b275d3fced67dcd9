"""Layer-input Hessians ``H = XᵀX``: streaming accumulation, damping, dead columns."""

from __future__ import annotations

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
    hessian: torch.Tensor = field(init=False)
    tokens: int = field(init=False, default=0)

    def __post_init__(self) -> None:
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
        return x.T @ x, x.shape[0]


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
