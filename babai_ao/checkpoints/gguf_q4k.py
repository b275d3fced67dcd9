"""Babai's nearest plane on llama.cpp's Q4_K grid, with the blocks it decodes from.

A Q4_K super-block holds 256 consecutive weights of one row (along the input dimension) as
8 sub-blocks of 32. It stores fp16 ``d`` and ``dmin``, and per sub-block ``j`` a 6-bit
scale ``sc_j`` and a 6-bit min ``m_j`` (0..63); weight ``i`` of sub-block ``j`` decodes as

    w = (d·sc_j)·q − dmin·m_j,   q ∈ 0..15.

With the step ``s_j = d·sc_j`` and the offset ``o_j = dmin·m_j`` this is babai-ao's grid
``s·(q − z)`` with ``z = o_j / s_j`` — a real, usually non-integer zero. The solver's
integer grid is used unchanged on the shifted weight ``W + O`` (``O`` repeats ``o_j`` over
its sub-block): ``W + O − s·q = W − (s·q − O)``, so every residual, every error update of
the nearest-plane pass and the output error ``tr((W−Q) H (W−Q)ᵀ)`` are those of ``W``
against ``Q = s·q − O``, and the grid ``s·q`` has the integer zero 0.

The grid is fixed first, from the float weight (``fit_q4_k``: each sub-block's min-max
range ``[min(w, 0), max(w, 0)]`` gives a step and an offset; ``d``/``dmin`` are the largest
of them over 63, in fp16; ``sc``/``m`` the nearest 6-bit multiples, ``sc ≥ 1``); then only
the codes are chosen, by Babai (``quantize_q4_k`` with a Hessian) or by rounding
(``hessian=None``, RTN on the same grid).

Exactness: ``d·sc``, ``(d·sc)·q`` and ``dmin·m`` are exact in float32 (an 11-bit fp16
mantissa times integers below 2^10), so the only rounding in the decoder is the final
subtraction, and ``Q4KWeight.dequantize`` performs that same float32 subtraction: gguf's
(and llama.cpp's) Q4_K dequantization of ``encode_q4_k``'s bytes equals it bit for bit, and
the certificate's error is computed from that float32 ``Q``.

Block bytes (144, as ggml lays them out): ``d`` (fp16), ``dmin`` (fp16), 12 bytes of 6-bit
scales and mins, 128 bytes of nibbles. Scale bytes ``0..3`` hold ``sc_0..3`` in their low 6
bits, bytes ``4..7`` ``m_0..3``; sub-blocks 4..7 keep their low 4 bits in bytes ``8..11``
(``sc`` low nibble, ``m`` high nibble) and their top 2 bits in the top 2 bits of bytes
``0..3`` (``sc``) and ``4..7`` (``m``). Nibble bytes come in 4 chunks of 32: byte ``i`` of
chunk ``c`` holds weight ``i`` of sub-block ``2c`` (low nibble) and of ``2c+1`` (high).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from babai_ao.errors import BabaiError
from babai_ao.lattice.quantize import Certificate, quantize_weight

SUPER = 256  # weights per super-block
SUB = 32  # weights per sub-block
SUBS = SUPER // SUB
MAX6 = 63  # largest 6-bit scale / min
MAXQ = 15  # largest 4-bit code
BLOCK_BYTES = 2 + 2 + 12 + SUPER // 2


@dataclass(frozen=True)
class Q4KGrid:
    """The Q4_K grid of a weight [N, K]: per super-block ``d``, ``dmin`` (fp16, [N, K/256])
    and per sub-block ``sc``, ``m`` (int64 in 0..63, [N, K/32])."""

    d: torch.Tensor
    dmin: torch.Tensor
    sc: torch.Tensor
    m: torch.Tensor

    def step(self) -> torch.Tensor:
        """``s_j = d·sc_j`` per sub-block, float32 [N, K/32] (exact)."""
        return self.d.float().repeat_interleave(SUBS, dim=-1) * self.sc.float()

    def offset(self) -> torch.Tensor:
        """``o_j = dmin·m_j`` per sub-block, float32 [N, K/32] (exact; decodes as ``−o_j``)."""
        return self.dmin.float().repeat_interleave(SUBS, dim=-1) * self.m.float()


def _fp16_positive(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to fp16, never below fp16's smallest subnormal (so never zero)."""
    tiny = 2.0 ** -24
    return x.clamp(min=tiny).to(torch.float16).clamp(min=tiny)


def fit_q4_k(weight: torch.Tensor) -> Q4KGrid:
    """Q4_K grid of ``weight`` [N, K] from its values (``K`` a multiple of 256).

    Sub-block ``j``: ``lo = min(w, 0)``, ``hi = max(w, 0)``, wanted step ``(hi − lo)/15``
    and offset ``−lo``. Super-block: ``d = max step / 63``, ``dmin = max offset / 63``
    (fp16, positive); ``sc = clamp(round(step / d), 1, 63)`` (a zero step would make every
    code decode alike) and ``m = clamp(round(offset / dmin), 0, 63)``.
    """
    n, k = weight.shape
    if k % SUPER:
        raise BabaiError(f"Q4_K needs in_features a multiple of {SUPER}, got {k}")
    w = weight.detach().double().reshape(n, k // SUB, SUB)
    lo = w.amin(dim=-1).clamp(max=0)
    hi = w.amax(dim=-1).clamp(min=0)
    step = ((hi - lo) / MAXQ).reshape(n, k // SUPER, SUBS)
    off = (-lo).reshape(n, k // SUPER, SUBS)
    d = _fp16_positive(step.amax(dim=-1) / MAX6)
    dmin = _fp16_positive(off.amax(dim=-1) / MAX6)
    sc = torch.round(step / d.double()[..., None]).clamp(1, MAX6)
    m = torch.round(off / dmin.double()[..., None]).clamp(0, MAX6)
    return Q4KGrid(d, dmin, sc.long().reshape(n, -1), m.long().reshape(n, -1))


@dataclass
class Q4KWeight:
    """Codes on a Q4_K grid and what they cost: ``error = tr((W−Q) H (W−Q)ᵀ)`` with ``Q`` the
    float32 weight the blocks decode to (``H = I`` when quantized without a Hessian)."""

    codes: torch.Tensor  # int64 [N, K], 0..15
    grid: Q4KGrid
    error: float
    clipped: int  # codes the nearest-plane pass clamped to 0..15
    certificate: Certificate | None = None  # the nearest-plane pass's, on ``W + O``

    def dequantize(self) -> torch.Tensor:
        """``Q = (d·sc)·q − dmin·m`` in float32, the decoder's own arithmetic."""
        step = self.grid.step().repeat_interleave(SUB, dim=-1)
        off = self.grid.offset().repeat_interleave(SUB, dim=-1)
        return step * self.codes.float() - off


def quantize_q4_k(weight: torch.Tensor, hessian: torch.Tensor | None = None,
                  grid: Q4KGrid | None = None, **kwargs: object) -> Q4KWeight:
    """Codes of ``weight`` [N, K] on a Q4_K grid (default ``fit_q4_k(weight)``).

    Runs ``quantize_weight`` on ``W + O`` with the explicit steps ``s = d·sc`` and zero 0
    (see the module docstring); ``hessian=None`` is round-to-nearest on the same grid.
    ``kwargs`` go to ``quantize_weight`` (``damp``, ``order``, ``block_size`` …).
    """
    grid = fit_q4_k(weight) if grid is None else grid
    w = weight.detach().double()
    step = grid.step().double()
    shifted = w + grid.offset().double().repeat_interleave(SUB, dim=-1)
    qw = quantize_weight(shifted, hessian, bits=4, group_size=SUB, scales=step,
                         zeros=torch.zeros_like(step), dtype=torch.float64,
                         scale_dtype=torch.float64, **kwargs)  # type: ignore[arg-type]
    out = Q4KWeight(qw.codes.long(), grid, 0.0, qw.certificate.clipped, qw.certificate)
    diff = w - out.dequantize().double()
    h = torch.eye(w.shape[1], dtype=torch.float64) if hessian is None else hessian.double()
    out.error = float(((diff @ h) * diff).sum())
    return out


def encode_q4_k(q: Q4KWeight) -> np.ndarray:
    """GGUF Q4_K blocks of ``q``: uint8 [N, K/256 · 144], row-major like ggml."""
    n, k = q.codes.shape
    s = k // SUPER
    sc = q.grid.sc.reshape(n, s, SUBS)
    m = q.grid.m.reshape(n, s, SUBS)
    if bool(((sc < 0) | (sc > MAX6) | (m < 0) | (m > MAX6)).any()) or bool(
            ((q.codes < 0) | (q.codes > MAXQ)).any()):
        raise BabaiError("Q4_K holds 6-bit scales/mins and 4-bit codes: a value is outside")
    lo_sc, hi_sc, lo_m, hi_m = sc[..., :4], sc[..., 4:], m[..., :4], m[..., 4:]
    scale_bytes = torch.cat([
        lo_sc | ((hi_sc >> 4) << 6),  # bytes 0..3: sc_0..3, top bits of sc_4..7
        lo_m | ((hi_m >> 4) << 6),  # bytes 4..7: m_0..3, top bits of m_4..7
        (hi_sc & 0xF) | ((hi_m & 0xF) << 4),  # bytes 8..11: low nibbles of sc/m 4..7
    ], dim=-1)
    codes = q.codes.reshape(n, s, SUBS // 2, 2, SUB)
    nibbles = (codes[..., 0, :] | (codes[..., 1, :] << 4)).reshape(n, s, SUPER // 2)
    parts = [q.grid.d.to(torch.float16).reshape(n, s, 1).view(torch.uint8),
             q.grid.dmin.to(torch.float16).reshape(n, s, 1).view(torch.uint8),
             scale_bytes.to(torch.uint8), nibbles.to(torch.uint8)]
    return torch.cat(parts, dim=-1).reshape(n, s * BLOCK_BYTES).numpy()
