"""SSQR: b-bit group grids shrunk by a multiplier, no clipping, out-of-range codes sparse.

Each group's min-max grid (``grid.Grid.fit`` on the original weights) is shrunk by ``m``:
``s' = m·s`` (rounded to the scale dtype) around the centre ``c = (lo+hi)/2`` of the group's
range, ``z' = clamp(round(−c/s' + (2^b−1)/2), 0, 2^b−1)`` (at ``m = 1`` this is min-max's
zero). Babai's nearest plane then runs with this fixed grid and no clamping, so its
certificate ``E ≤ B = ¼ Σ d_j s'²`` holds. Codes inside ``[0, 2^b−1]`` are stored densely
(packed, ``babai_ao.formats.packing``); the rest as a CSR correction ``δ = q − clamp(q)``
(``babai_ao.formats.outliers``), so ``W = s'·(clamp(q) − z') + s'·δ``. ``m < 1`` trades a finer
step (smaller ``B``) for more outliers; ``m`` is found by a search for a target outlier
density or a target average bits per weight (every stored byte counted).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from babai_ao.errors import BabaiError
from babai_ao.lattice.grid import Grid
from babai_ao.lattice.quantize import Certificate, _check_weight, quantize_weight

from . import outliers
from .accounting import StoredLayer
from .packed_weight import dequantize_packed
from .packing import pack, unpack
from .search import solve_decreasing

LOG2_M_RANGE = (-4.0, 3.0)  # multipliers 1/16 … 8


@dataclass
class SSQRWeight(StoredLayer):
    """One layer in SSQR form: packed dense codes, group grid, CSR outliers."""

    packed: torch.Tensor  # uint8 [N, ceil(K/8)·b]
    scales: torch.Tensor  # [N, G] scale dtype
    zeros: torch.Tensor  # uint8, N·G zeros packed flat at b bits
    csr: outliers.CSR
    bits: int
    group_size: int
    in_features: int
    multiplier: float
    certificate: Certificate

    @property
    def out_features(self) -> int:
        return int(self.packed.shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every stored tensor, named as ``babai::linear``'s arguments."""
        return {"packed": self.packed, "scales": self.scales, "zeros": self.zeros,
                "outlier_ptr": self.csr.ptr, "outlier_idx": self.csr.idx,
                "outlier_val": self.csr.val}

    @property
    def outlier_density(self) -> float:
        return self.csr.nnz / (self.out_features * self.in_features)

    def codes(self) -> torch.Tensor:
        """The unbounded codes, int64 [N, K]: dense part plus the CSR deltas."""
        dense = unpack(self.packed, self.bits, self.in_features)
        return outliers.merge(dense, self.csr)

    def zero_points(self) -> torch.Tensor:
        n, g = self.scales.shape
        return unpack(self.zeros.reshape(1, -1), self.bits, n * g).reshape(n, g).long()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_packed(self.packed, self.scales, self.zeros, self.bits,
                                 self.group_size, self.in_features, self.csr.ptr,
                                 self.csr.idx, self.csr.val, dtype=dtype)


def shrunk_grid(weight: torch.Tensor, bits: int, group_size: int, multiplier: float,
                scale_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros [N, G] of the min-max grids shrunk by ``multiplier`` about their centre."""
    if not multiplier > 0:
        raise BabaiError(f"multiplier={multiplier} must be positive (1 = min-max grid)")
    grid = Grid(bits=bits, scale_dtype=scale_dtype)
    n, k = weight.shape
    w = weight.detach().to(torch.float32).reshape(n, k // group_size, group_size)
    lo = w.amin(-1).clamp(max=0)
    hi = w.amax(-1).clamp(min=0)
    base, _ = grid.fit(w.reshape(-1, group_size))
    scale = grid.storable(base.reshape(lo.shape) * multiplier)
    zero = torch.round(-(lo + hi) / 2 / scale + grid.maxq / 2).clamp(0, grid.maxq)
    return scale, zero


def quantize_with_multiplier(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    bits: int,
    group_size: int,
    multiplier: float,
    order: str = "natural",
    damp: float = 0.01,
    scale_dtype: torch.dtype = torch.float16,
) -> SSQRWeight:
    """SSQR at a fixed multiplier ``m``."""
    n, k = weight.shape
    scale, zero = shrunk_grid(weight, bits, group_size, multiplier, scale_dtype)
    qw = quantize_weight(weight, hessian, bits=bits, group_size=group_size, order=order,
                         clip=False, damp=damp, scales=scale, zeros=zero,
                         scale_dtype=scale_dtype)
    clamped, csr = outliers.split(qw.codes, 0, 2**bits - 1)
    out = SSQRWeight(
        packed=pack(clamped, bits), scales=qw.scales,
        zeros=pack(qw.zeros.reshape(1, -1), bits).reshape(-1), csr=csr, bits=bits,
        group_size=qw.group_size, in_features=k, multiplier=multiplier,
        certificate=qw.certificate)
    out.certificate = dataclasses.replace(qw.certificate, bits_per_weight=out.bits_per_weight)
    return out


def quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor | None = None,
    bits: int = 3,
    group_size: int | None = 64,
    *,
    target_bits: float | None = None,
    outlier_density: float | None = None,
    multiplier: float | None = None,
    order: str = "natural",
    damp: float = 0.01,
    tol: float = 0.005,
    scale_dtype: torch.dtype = torch.float16,
) -> SSQRWeight:
    """SSQR for one weight [N, K] against ``hessian`` [K, K] (``None``: ``H = I``).

    Give at most one of ``target_bits`` (average stored bits per weight, hit within ``tol``),
    ``outlier_density`` (fraction of weights stored as outliers, hit within 5 % relative)
    or ``multiplier`` (default 1: the plain min-max grid, outliers only where Babai's error
    feedback pushes codes out of range).
    """
    g = _check_weight(weight, group_size)
    if bits not in (2, 3, 4, 8):
        raise BabaiError(f"SSQR bits={bits} unsupported: choose 2, 3, 4 or 8")
    given = [v is not None for v in (target_bits, outlier_density, multiplier)]
    if sum(given) > 1:
        raise BabaiError("give only one of target_bits, outlier_density, multiplier")

    def at(log2_m: float) -> SSQRWeight:
        return quantize_with_multiplier(weight, hessian, bits, g, 2.0**log2_m, order, damp,
                                        scale_dtype)

    if target_bits is not None:
        res = solve_decreasing(lambda x: ((r := at(x)).bits_per_weight, r), target_bits,
                               x0=0.0, slope=-1.0, tol=tol, lo=LOG2_M_RANGE[0],
                               hi=LOG2_M_RANGE[1], what="target_bits")
        return res.payload
    if outlier_density is not None:
        if not 0 < outlier_density < 1:
            raise BabaiError(f"outlier_density={outlier_density} must be in (0, 1), e.g. 0.01")
        floor = 0.5 / weight.numel()  # log of a zero density stays finite

        def log_density(x: float) -> tuple[float, SSQRWeight]:
            r = at(x)
            return math.log2(max(r.outlier_density, floor)), r

        res = solve_decreasing(log_density, math.log2(outlier_density), x0=-0.5, slope=-4.0,
                               tol=math.log2(1.05), lo=LOG2_M_RANGE[0], hi=LOG2_M_RANGE[1],
                               what="outlier_density")
        return res.payload
    return at(math.log2(1.0 if multiplier is None else multiplier))
