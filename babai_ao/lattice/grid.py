"""Uniform integer grids: ``w ≈ s · (q − z)`` with integer codes ``q``.

Asymmetric min-max over a group: the range ``[min(w, 0), max(w, 0)]`` (widened to hold 0,
as GPTQ's reference quantizer does) is split into ``2^b − 1`` steps, ``s = (max − min) /
(2^b − 1)``, ``z = round(−min / s)``. Symmetric: ``m = max|w|``, ``s = 2m / (2^b − 1)``,
``z = 2^(b−1)``. Scales are rounded to the storage dtype (float16 by default) *before*
they are used, so the stored grid is exactly the grid the algorithm quantized to.

``exact_offset=True`` (asymmetric grids) also keeps the offset ``s·z`` exact in the scale
dtype: formats that store a minimum ``m = −s·z`` instead of a zero code (GGUF's Q4_1, ``w =
d·q + m`` with fp16 ``d`` and ``m``) then decode to exactly this grid. Where ``s·z`` is not
representable, the scale moves to the nearest storable value (a few fp16 ulps at 4 bits)
whose offset is, and the zero is refit to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from babai_ao.errors import BabaiError

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class Grid:
    """A b-bit uniform grid; ``clip=False`` lets codes run outside ``[0, 2^b − 1]``."""

    bits: int = 4
    symmetric: bool = False
    clip: bool = True
    scale_dtype: torch.dtype = torch.float16
    exact_offset: bool = False

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise BabaiError(
                f"unsupported bits={self.bits}: choose one of {SUPPORTED_BITS} "
                "(for other widths use the no-clipping formats clip='ssqr' or clip='hptq')"
            )

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero for each row of ``w`` [rows, cols] (one group per row)."""
        if self.symmetric:
            m = w.abs().amax(dim=-1)
            m = torch.where(m == 0, torch.ones_like(m), m)
            scale = 2 * m / self.maxq
            zero = torch.full_like(scale, float((self.maxq + 1) // 2))
        else:
            lo = w.amin(dim=-1).clamp(max=0)
            hi = w.amax(dim=-1).clamp(min=0)
            empty = (lo == 0) & (hi == 0)
            lo = torch.where(empty, -torch.ones_like(lo), lo)
            hi = torch.where(empty, torch.ones_like(hi), hi)
            scale = (hi - lo) / self.maxq
            scale = self.storable(scale)
            zero = torch.round(-lo / scale).clamp(0, self.maxq)
            if self.exact_offset:
                return self._exact_offsets(scale, zero, lo)
        return self.storable(scale), zero

    def _exact_offsets(self, scale: torch.Tensor, zero: torch.Tensor, lo: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The storable scale nearest ``scale`` (0, +1, −1, +2 … ulps of the scale dtype) for
        which ``s·z`` (``z = round(−lo/s)``) is exact in the scale dtype. A mantissa that is
        a multiple of ``2^b`` always qualifies, so ``2^(b−1)`` ulps each way suffice."""
        bits_dtype = {2: torch.int16, 4: torch.int32}[torch.finfo(self.scale_dtype).bits // 8]
        raw = scale.to(self.scale_dtype).view(bits_dtype)
        best_s, best_z = scale.clone(), zero.clone()
        done = self._offset_exact(scale, zero)
        for k in range(1, 2 ** (self.bits - 1) + 1):
            for step in (k, -k):
                cand = (raw + step).clamp(min=1).view(self.scale_dtype).to(scale.dtype)
                z = torch.round(-lo / cand).clamp(0, self.maxq)
                take = ~done & self._offset_exact(cand, z)
                best_s, best_z = torch.where(take, cand, best_s), torch.where(take, z, best_z)
                done |= take
            if bool(done.all()):
                break
        if not bool(done.all()):
            raise BabaiError(f"no {self.scale_dtype} scale near the min-max one keeps s·z "
                             "exact for some groups: quantize without exact_offset")
        return best_s, best_z

    def _offset_exact(self, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Where ``s·z`` survives a round trip through the scale dtype unchanged."""
        off = scale.double() * zero.double()
        return off.to(self.scale_dtype).double() == off

    def storable(self, scale: torch.Tensor) -> torch.Tensor:
        """Round a scale to its storage dtype (never to zero) and back to the compute dtype."""
        tiny = torch.finfo(self.scale_dtype).tiny
        return scale.clamp(min=tiny).to(self.scale_dtype).to(scale.dtype)

    def round(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Nearest grid code of ``w`` (float tensor of integers), clamped when ``clip``."""
        q = torch.round(w / scale) + zero
        return q.clamp(0, self.maxq) if self.clip else q


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int
               ) -> torch.Tensor:
    """``W[n, k] = s[n, k // g] · (q[n, k] − z[n, k // g])``."""
    s = scale.repeat_interleave(group_size, dim=-1)[..., : codes.shape[-1]]
    z = zero.repeat_interleave(group_size, dim=-1)[..., : codes.shape[-1]]
    return s * (codes.to(s.dtype) - z.to(s.dtype))
