"""``quantize_weight``: one linear layer's weight, quantized by Babai's nearest plane.

The result carries a certificate: LDL pivots ``d_j`` (quantization order), the exact output
error ``E = tr((W−Q) H (W−Q)ᵀ)``, the identity ``Σ_rows Σ_j d_j r_j²`` (equal to ``E``), and
Babai's bound ``B = ¼ Σ_rows Σ_j d_j s²_{row,group(j)}``, which holds (``E ≤ B``) whenever no
code was clipped. ``hessian=None`` means ``H = I``: plain round-to-nearest on the same grid.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from babai_ao.errors import BabaiError

from .babai import nearest_plane
from .grid import Grid, dequantize
from .hessian import damped, validate_hessian
from .kbest import kbest_nearest_plane, keep_better
from .ldl import inverse_cholesky, quantization_order
from .refine import coordinate_descent

SCALE_BITS = 16
SEARCHES = ("babai", "kbest")


@dataclass
class Certificate:
    """What Babai guarantees for one quantized matrix (see module docstring)."""

    pivots: torch.Tensor  # d_j in quantization order
    error: float  # tr((W−Q) H_damped (W−Q)ᵀ)
    error_undamped: float  # tr((W−Q) H (W−Q)ᵀ) ≤ error
    identity: float  # Σ d_j r_j² of the Babai pass: equals ``error`` unless refined/searched
    bound: float  # ¼ Σ d_j s_j²; valid when clipped == 0
    clipped: int  # codes that were clamped to the grid's range
    bits_per_weight: float
    damp_lambda: float = 0.0
    dead_columns: list[int] = field(default_factory=list)
    order: str = "natural"

    @property
    def trace_d(self) -> float:
        return float(self.pivots.sum())

    @property
    def bound_holds(self) -> bool:
        return self.clipped == 0 and self.error <= self.bound * (1 + 1e-6)

    def summary(self) -> dict[str, float | int | str]:
        return {"order": self.order, "trace_d": self.trace_d, "error": self.error,
                "error_undamped": self.error_undamped, "bound": self.bound,
                "clipped": self.clipped, "bits_per_weight": self.bits_per_weight,
                "dead_columns": len(self.dead_columns)}


@dataclass
class QuantizedWeight:
    """Integer codes in the weight's own column order; ``W ≈ s[:, k//g] · (q − z[:, k//g])``."""

    codes: torch.Tensor  # int32 [N, K]; in [0, 2^b − 1] when clipped, unbounded otherwise
    scales: torch.Tensor  # [N, K // g], values exact in grid.scale_dtype
    zeros: torch.Tensor  # int32 [N, K // g]
    perm: torch.Tensor  # quantization order (int64 [K])
    group_size: int
    grid: Grid
    certificate: Certificate

    @property
    def error(self) -> float:
        return self.certificate.error

    @property
    def bound(self) -> float:
        return self.certificate.bound

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes, self.scales.to(dtype), self.zeros, self.group_size)


def _check_weight(weight: torch.Tensor, group_size: int | None) -> int:
    if weight.dim() != 2:
        raise BabaiError(f"weight must be 2-D [out_features, in_features], got shape "
                         f"{tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise BabaiError(f"weight must be a float tensor, got {weight.dtype}")
    if not torch.isfinite(weight).all():
        raise BabaiError("weight contains NaN/Inf: fix the checkpoint before quantizing")
    k = weight.shape[1]
    g = k if group_size in (None, -1) else int(group_size)
    if g <= 0 or k % g:
        raise BabaiError(f"group_size={group_size} does not divide in_features={k}: choose a "
                         f"divisor of {k} (e.g. 32, 64) or group_size=None for per-channel")
    return g


ROW_CHUNK = 1 << 25  # weights per chunk of rows when there is no Hessian (RTN)


def _stack_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Row chunks of one weight quantized alike (same columns, order, grid) as one result;
    the certificate's sums add up over the chunks."""
    first = parts[0].certificate
    total = {f: sum(getattr(p.certificate, f) for p in parts)
             for f in ("error", "error_undamped", "identity", "bound", "clipped")}
    return dataclasses.replace(
        parts[0], codes=torch.cat([p.codes for p in parts]),
        scales=torch.cat([p.scales for p in parts]), zeros=torch.cat([p.zeros for p in parts]),
        certificate=dataclasses.replace(first, **total))


def quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor | None = None,
    *,
    bits: int = 4,
    group_size: int | None = 128,
    symmetric: bool = False,
    order: str = "natural",
    clip: bool = True,
    damp: float = 0.01,
    block_size: int = 128,
    dtype: torch.dtype = torch.float32,
    static_groups: bool | None = None,
    scales: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
    scale_dtype: torch.dtype = torch.float16,
    refine: int = 0,
    exact_offset: bool = False,
    grid: Grid | None = None,
    search: str = "babai",
    k: int = 16,
) -> QuantizedWeight:
    """Quantize ``weight`` [N, K] against ``hessian`` [K, K] (``XᵀX`` of the layer's inputs).

    Groups run along the input dimension (``group_size=None``: one group per row). With the
    natural order a group's scale and zero are fixed from the error-updated weights when the
    group is reached (GPTQ's lazy grouping); with any other order, or ``static_groups=True``,
    from the original weights up front, so groups stay contiguous in storage. Explicit
    ``scales``/``zeros`` [N, K // g] fix the grid (used by the no-clipping formats).
    ``refine`` > 0 runs that many coordinate-descent sweeps after Babai
    (``babai_ao.lattice.refine``): the error can only go down, ``identity`` keeps Babai's own.
    ``exact_offset`` keeps ``s·z`` exact in ``scale_dtype`` (``Grid``; for GGUF's Q4_1).
    ``grid``: an explicit ``Grid`` (or subclass, e.g. a width no packed tensor stores, for
    GGUF's Q5_0) used instead of the one ``bits``/``symmetric``/``clip``/``scale_dtype``/
    ``exact_offset`` describe; those arguments are then ignored.
    ``search="kbest"`` keeps ``k`` survivors per row (``babai_ao.lattice.kbest``; static grids
    only) and takes, row by row, the better of its path and Babai's: ``error ≤`` Babai's
    ``identity``, so ``E ≤ B`` still holds whenever Babai's own pass clipped nothing.
    """
    if grid is None:
        grid = Grid(bits=bits, symmetric=symmetric, clip=clip, scale_dtype=scale_dtype,
                    exact_offset=exact_offset)
    bits, clip, scale_dtype = grid.bits, grid.clip, grid.scale_dtype
    g = _check_weight(weight, group_size)
    if search not in SEARCHES:
        raise BabaiError(f"search={search!r} is unknown: choose one of {SEARCHES}")
    if search == "kbest" and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise BabaiError(f"k={k!r} must be an integer >= 1 (survivors per row; e.g. 16)")
    beam = k
    n, k = weight.shape
    if hessian is None and n * k > ROW_CHUNK and n > 1:
        # H = I: every row is rounded on its own (on its own grid, or the given one's rows);
        # rows in chunks bound the temporaries
        rows = max(1, ROW_CHUNK // k)
        return _stack_rows([
            quantize_weight(weight[i:i + rows], None, group_size=group_size, order=order,
                            damp=damp, block_size=block_size, dtype=dtype,
                            static_groups=static_groups, grid=grid, search=search, k=beam,
                            scales=None if scales is None else scales[i:i + rows],
                            zeros=None if zeros is None else zeros[i:i + rows])
            for i in range(0, n, rows)])
    w = weight.detach().to(dtype).clone()
    if hessian is None:
        h0 = torch.eye(k, dtype=dtype, device=w.device)
    else:
        validate_hessian(hessian, k)
        h0 = hessian.detach().to(dtype=dtype, device=w.device)
    h, lam, dead = damped(h0, damp)
    w[:, dead] = 0
    perm = quantization_order(h, order)
    if hessian is None:  # H = (1 + damp)·I: U = H^{-1/2} is diagonal (what Cholesky gives)
        upper = torch.diag(1 / h.diagonal()[perm].sqrt())
    else:
        upper = inverse_cholesky(h[perm][:, perm])
    ngroups = k // g
    if (scales is None) != (zeros is None):
        raise BabaiError("pass both scales and zeros (or neither)")
    if scales is not None:
        if scales.shape != (n, ngroups) or zeros.shape != (n, ngroups):
            raise BabaiError(f"scales/zeros must have shape ({n}, {ngroups})")
        scale, zero = scales.to(dtype).clone(), zeros.to(dtype).clone()
        static = True
    else:
        static = order != "natural" or g == k if static_groups is None else static_groups
        static = static or hessian is None  # H = I: no feedback, lazy grids equal static ones
        if static:
            scale, zero = grid.fit(w.reshape(n, ngroups, g))
        else:
            scale = torch.empty(n, ngroups, dtype=dtype, device=w.device)
            zero = torch.empty_like(scale)
    group_of = (perm // g).tolist()

    def grid_at(j: int, rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gi = group_of[j]
        if not static and j % g == 0:
            scale[:, gi], zero[:, gi] = grid.fit(rest[:g].T)
        return scale[:, gi], zero[:, gi]

    if search == "kbest" and not static:
        raise BabaiError("search='kbest' needs grids fixed up front: use order='act' or "
                         "'min-pivot', or static_groups=True")
    if not static and block_size % g:
        block_size = g * max(1, block_size // g)  # a lazy group must lie inside one block
    if hessian is None:  # H = I: U is diagonal, nothing is fed forward; Babai is rounding
        wp, cols = w[:, perm], (perm // g)
        codes_p = grid.round(wp, scale[:, cols], zero[:, cols])
        resid_p = wp - scale[:, cols] * (codes_p - zero[:, cols])
    else:
        codes_p, resid_p = nearest_plane(w[:, perm], upper, grid, grid_at, block_size)
    d = upper.diagonal().pow(-2)
    babai_identity = resid_p.pow(2) @ d  # per row
    babai_resid = resid_p
    if search == "kbest" and hessian is not None:
        cols = perm // g
        found = kbest_nearest_plane(w[:, perm], upper, scale[:, cols], zero[:, cols],
                                    grid.maxq if clip else None, k=beam)
        codes_p, resid_p, _ = keep_better(*found, codes_p, resid_p, babai_identity)
    codes = torch.empty_like(codes_p)
    codes[:, perm] = codes_p
    if refine and hessian is not None:
        cols = torch.arange(k, device=w.device) // g
        codes, _ = coordinate_descent(w, codes, scale[:, cols], zero[:, cols], h,
                                      grid.maxq if clip else None, refine, block_size)

    q = dequantize(codes, scale, zero, g)
    diff = w - q
    step2 = scale.pow(2)[:, perm // g]  # s² per (row, quantization step)
    half = 0.5 * scale[:, perm // g]
    clipped = int((babai_resid.abs() > half * (1 + 1e-5) + 1e-12).sum()) if clip else 0
    zero_bits = bits  # zeros are stored packed at the code width
    hd = diff * h.diagonal() if hessian is None else diff @ h  # H diagonal: same products
    error = float((hd * diff).sum())
    cert = Certificate(
        pivots=d,
        error=error,
        error_undamped=error - lam * float(diff.pow(2).sum()),  # H = H0 + λI off dead columns
        identity=float(babai_identity.sum()),
        bound=float(0.25 * (step2 * d).sum()),
        clipped=clipped,
        bits_per_weight=bits + (SCALE_BITS + zero_bits) / g,
        damp_lambda=lam,
        dead_columns=dead.tolist(),
        order=order,
    )
    return QuantizedWeight(
        codes=codes.to(torch.int32), scales=scale.to(scale_dtype), zeros=zero.to(torch.int32),
        perm=perm, group_size=g, grid=grid, certificate=cert)
