"""A whole model on llama.cpp's Q4_K file layout, calibrated by Babai block by block.

llama.cpp's own Q4_K quantizer (``llama_model_quantize``) stores each block linear as Q4_K
when its rows (``in_features``) are a multiple of 256, and otherwise falls back to Q5_0
(``tensor_type_fallback`` in its src/llama-quant.cpp: Q4_K → Q5_0; rows not a multiple of 32
→ F16). This module chooses the same type per linear, so a file it writes and llama.cpp's
Q4_K of the same float model store the very same types, at equal bits per weight:

======  =========================================  ================  =============
GGUF    block decodes                              grid (Babai)      bits / weight
======  =========================================  ================  =============
Q4_K    ``(d·sc_j)·q − dmin·m_j``, q ∈ 0..15      ``gguf_q4k``      144·8/256 = 4.5
Q5_0    ``d·(q − 16)``, q ∈ 0..31, per 32          5-bit symmetric   22·8/32 = 5.5
======  =========================================  ================  =============

(SmolLM2: every linear reads 576 = 2.25·256 features but ``down_proj``, 1536 = 6·256, so
30 linears are Q4_K and 180 Q5_0.) A Q5_0 block is babai-ao's symmetric grid at 5 bits in
groups of 32 exactly (``z = 16``, fp16 scale ``d = s``); no packed babai-ao tensor stores 5
bits, so the grid is a ``BlockGrid`` (any width) and the codes go straight to GGUF blocks.

``GGUFQ4KConfig`` is a ``quantize_model`` config that builds each weight itself
(``builds_tensors``): against the linear's Hessian it fixes the grid from the float weight
(Q4_K: ``fit_q4_k``'s super-block scales and mins; Q5_0: min-max per group) and runs Babai's
nearest plane on exactly that grid, then installs the weight the blocks decode to, as a plain
float32 tensor (the model computes with exactly what llama.cpp reads) and keeps the encoded
blocks (``GGUFBlocks``). ``grid_fit="weighted"`` fixes the grids by llama.cpp's
importance-matrix criterion instead (``gguf_fit``, from the same Hessian); ``"best"`` (the
default: P1 21.141 vs 21.222 min-max) keeps per layer whichever leaves the lower output error. ``quantize_q4_k_model`` runs the sequential calibration and returns
them by parameter name, for ``save_gguf(model, path, mode="q4_k", blocks=...)``, which checks
that gguf-py decodes every one to the model's weight before it writes the file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from babai_ao.errors import BabaiError
from babai_ao.lattice.grid import Grid
from babai_ao.lattice.quantize import Certificate, quantize_weight

from .gguf_fit import fit_q4_k_weighted, fit_q5_0, importance
from .gguf_q4k import BLOCK_BYTES, SUPER, Q4KGrid, encode_q4_k, fit_q4_k, quantize_q4_k

Q5_BLOCK = 32
Q5_BYTES = 2 + 4 + Q5_BLOCK // 2  # d, 32 high bits, 16 bytes of low nibbles
Q5_ZERO = 16
GRID_FITS = ("minmax", "weighted", "best")
BITS = {"Q4_K": 8 * BLOCK_BYTES / SUPER, "Q5_0": 8 * Q5_BYTES / Q5_BLOCK}


@dataclass(frozen=True)
class BlockGrid(Grid):
    """A ``Grid`` of any width 2..8, for codes that GGUF blocks store (never packed here)."""

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise BabaiError(f"a GGUF block grid has 2..8 bits, got {self.bits}")


@dataclass
class GGUFBlocks:
    """One linear as GGUF blocks: ``data`` uint8 ``[N, bytes per row]`` of ``ggml_type``."""

    ggml_type: str  # "Q4_K" or "Q5_0" (gguf.GGMLQuantizationType member)
    data: np.ndarray
    certificate: Certificate

    @property
    def bits_per_weight(self) -> float:
        return BITS[self.ggml_type]


def block_type(in_features: int) -> str:
    """llama.cpp's type for a Q4_K file's linear with rows of ``in_features``."""
    if in_features % SUPER == 0:
        return "Q4_K"
    if in_features % Q5_BLOCK == 0:
        return "Q5_0"
    raise BabaiError(f"rows of {in_features} features fit neither Q4_K (multiples of {SUPER}) "
                     f"nor its fallback Q5_0 (multiples of {Q5_BLOCK}): llama.cpp would keep "
                     "this linear F16; leave it out (filter_fn) or use another model")


def encode_q5_0(codes: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """GGUF Q5_0 blocks: uint8 ``[N, K/32 · 22]``; ``codes`` [N, K] in 0..31, ``scale``
    [N, K/32] fp16. A block is ``d`` (fp16), a little-endian uint32 whose bit ``i`` is bit 4
    of code ``i``, then 16 bytes: low nibble = low 4 bits of code ``i``, high nibble those
    of code ``i + 16``."""
    n, k = codes.shape
    g = k // Q5_BLOCK
    q = codes.to(torch.int64).reshape(n, g, Q5_BLOCK)
    if bool(((q < 0) | (q > 31)).any()):
        raise BabaiError("Q5_0 holds 5-bit codes: a code is outside 0..31")
    qh = ((q >> 4) << torch.arange(Q5_BLOCK)).sum(-1)
    qh_bytes = torch.stack([(qh >> (8 * i)) & 0xFF for i in range(4)], dim=-1)
    low = q & 0xF
    parts = [scale.to(torch.float16).reshape(n, g, 1).view(torch.uint8),
             qh_bytes.to(torch.uint8),
             (low[..., :16] | (low[..., 16:] << 4)).to(torch.uint8)]
    return torch.cat(parts, dim=-1).reshape(n, g * Q5_BYTES).numpy()


def _fit_grid(weight: torch.Tensor, a: torch.Tensor | None) -> Q4KGrid | torch.Tensor:
    """The grid of ``block_type(K)`` for ``weight``: Q4_K's ``Q4KGrid``, Q5_0's fp16 scales
    [N, K/32]; min-max when ``a`` (importance) is ``None``, else fitted against ``a``."""
    if block_type(weight.shape[1]) == "Q4_K":
        return fit_q4_k(weight) if a is None else fit_q4_k_weighted(weight, a)
    return q5_0_minmax_scales(weight) if a is None else fit_q5_0(weight, a)


def q5_0_minmax_scales(weight: torch.Tensor) -> torch.Tensor:
    """Q5_0's min-max scales: ``d = max|w| / 16`` per group of 32, in fp16 (the symmetric
    5-bit grid's own scale rule, ``BlockGrid(bits=5, symmetric=True)``)."""
    grid = BlockGrid(bits=5, symmetric=True, clip=True, scale_dtype=torch.float16)
    n, k = weight.shape
    return grid.fit(weight.detach().reshape(n * k // Q5_BLOCK, Q5_BLOCK))[0].reshape(n, -1)


def _same_grid(a: Q4KGrid | torch.Tensor, b: Q4KGrid | torch.Tensor) -> bool:
    if isinstance(a, Q4KGrid):
        return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("d", "dmin", "sc", "m"))
    return torch.equal(a, b)


def _solve_on_grid(weight: torch.Tensor, hessian: torch.Tensor | None,
                   grid: Q4KGrid | torch.Tensor, order: str, damp: float, block_size: int
                   ) -> tuple[GGUFBlocks, torch.Tensor]:
    """Babai on the fixed ``grid`` (``_fit_grid``): the blocks and the weight they decode to."""
    kind = block_type(weight.shape[1])
    if kind == "Q4_K":
        q4 = quantize_q4_k(weight, hessian, grid=grid, order=order, damp=damp,
                           block_size=block_size)
        data, decoded, cert = encode_q4_k(q4), q4.dequantize(), q4.certificate
    else:
        fixed = BlockGrid(bits=5, symmetric=True, clip=True, scale_dtype=torch.float16)
        qw = quantize_weight(weight.detach(), hessian, group_size=Q5_BLOCK, order=order,
                             damp=damp, block_size=block_size, grid=fixed, scales=grid,
                             zeros=torch.full_like(grid, Q5_ZERO))
        data, decoded, cert = encode_q5_0(qw.codes, qw.scales), qw.dequantize(), qw.certificate
    cert = dataclasses.replace(cert, bits_per_weight=BITS[kind])
    return GGUFBlocks(kind, data, cert), decoded.to(torch.float32)


def quantize_block_weight(weight: torch.Tensor, hessian: torch.Tensor | None, *,
                          order: str = "act", damp: float = 0.01, block_size: int = 128,
                          grid_fit: str = "best") -> tuple[GGUFBlocks, torch.Tensor]:
    """Babai on the GGUF grid of ``weight`` [N, K] (``block_type(K)``): its blocks, and the
    float32 weight they decode to (``hessian=None``: round-to-nearest on that grid).

    ``grid_fit``: ``"minmax"`` takes each group's grid from its range; ``"weighted"`` from
    the ``diag H``-weighted rounding error (``gguf_fit``, llama.cpp's importance-matrix
    criterion; needs the Hessian); ``"best"`` (default) runs Babai on both and keeps the one
    whose output error ``tr((W−Q) H (W−Q)ᵀ)`` (the certificate's ``error``) is lower — one
    solve where the two grids coincide, and min-max alone without a Hessian (nothing to
    weight by)."""
    if grid_fit not in GRID_FITS:
        raise BabaiError(f"grid_fit={grid_fit!r} is unknown: choose one of {GRID_FITS}")
    if grid_fit == "weighted" and hessian is None:
        raise BabaiError("grid_fit='weighted' needs the layer's Hessian (calibration "
                         "data): calibrate, or use grid_fit='minmax'")
    if grid_fit == "best" and hessian is None:
        grid_fit = "minmax"
    solve = lambda grid: _solve_on_grid(weight, hessian, grid, order, damp,  # noqa: E731
                                        block_size)
    if grid_fit == "minmax":
        return solve(_fit_grid(weight, None))
    weighted = _fit_grid(weight, importance(hessian, damp))
    if grid_fit == "weighted":
        return solve(weighted)
    minmax = _fit_grid(weight, None)
    if _same_grid(minmax, weighted):
        return solve(minmax)
    return min(solve(minmax), solve(weighted), key=lambda t: t[0].certificate.error)


@dataclass
class GGUFQ4KConfig:
    """``quantize_model`` config: each linear becomes Q4_K (or llama.cpp's Q5_0 fallback)
    blocks by Babai; the model keeps the decoded float32 weights, ``blocks`` the bytes."""

    order: str = "act"
    damp: float = 0.01
    block_size: int = 128
    grid_fit: str = "best"
    blocks: dict[nn.Module, GGUFBlocks] = field(default_factory=dict)
    # what quantize_model reads (``_config_kwargs``); the grids themselves are fixed here
    bits: int = 4
    group_size: int = Q5_BLOCK
    symmetric: bool = False
    clip: bool = True
    builds_tensors: bool = True
    # blocks of weights built but not yet installed, by the decoded tensor's storage: a
    # stage's solves all run before its installs (``sequential._quantize_stage``)
    _pending: dict[int, GGUFBlocks] = field(default_factory=dict)

    def quantize_tensor(self, weight: torch.Tensor, hessian: torch.Tensor | None = None,
                        dtype: torch.dtype | None = None) -> torch.Tensor:
        """The decoded float32 weight (a plain tensor carrying the certificate)."""
        if weight.dtype != torch.float32 or (dtype or torch.float32) != torch.float32:
            raise BabaiError(f"GGUF Q4_K calibration needs a float32 model (got "
                             f"{weight.dtype}): load it with dtype=torch.float32")
        blocks, decoded = quantize_block_weight(weight, hessian, order=self.order,
                                                damp=self.damp, block_size=self.block_size,
                                                grid_fit=self.grid_fit)
        self._pending[decoded.data_ptr()] = blocks
        decoded.certificate = blocks.certificate  # read by quantize_model's report
        return decoded

    def applied_to(self, module: nn.Module) -> None:
        """Keep the blocks of the weight just installed in ``module``."""
        blocks = self._pending.pop(module.weight.data_ptr(), None)
        if blocks is None:
            raise BabaiError("applied_to without a quantized weight: call quantize_tensor "
                             "first (in this process: GGUF Q4_K export runs in one process)")
        self.blocks[module] = blocks


def quantize_q4_k_model(model: nn.Module, calibration: Any, *, order: str = "act",
                        damp: float = 0.01, mode: str = "sequential", batch_size: int = 8,
                        progress: bool = True, grid_fit: str = "best"
                        ) -> tuple[dict[str, GGUFBlocks], Any]:
    """Calibrate ``model`` (float32) block by block onto Q4_K/Q5_0 grids, in place.

    Returns ``(blocks by parameter name, QuantizationReport)``; the model then computes with
    the decoded weights. ``calibration`` and ``mode`` as for ``quantize_model``."""
    from babai_ao.calibration.sequential import quantize_model

    if grid_fit not in GRID_FITS:
        raise BabaiError(f"grid_fit={grid_fit!r} is unknown: choose one of {GRID_FITS}")
    config = GGUFQ4KConfig(order=order, damp=damp, grid_fit=grid_fit)
    report = quantize_model(model, config, calibration, mode=mode, batch_size=batch_size,
                            progress=progress)
    names = {m: n for n, m in model.named_modules()}
    return {f"{names[m]}.weight": b for m, b in config.blocks.items()}, report
