"""HPTQ: one step size, unbounded symmetric codes, canonical-Huffman-coded per tensor.

``W ≈ s_n · q`` with integer codes ``q`` of any size (zero point 0) from Babai's nearest
plane on the fixed grid (``quantize_weight(..., clip=False, scales=s, zeros=0)``), so nothing
is clipped and ``E ≤ B = ¼ Σ_n s_n² Σ_j d_j`` holds. The codes are Huffman-coded
(``babai_ao.formats.huffman``) and the step is searched (in ``log2 s``) so the stored bytes —
bitstream, codebook, chunk index, header and scales — hit a target average bit-width.
``s_n = s`` (one scale per tensor) by default; ``per_row=True`` uses ``s_n = s·ρ_n`` with
``ρ_n`` the row's RMS over the tensor's RMS (one more float16 per row). At equal rate an
entropy-coded uniform quantizer wants the same step wherever the error weighs the same, and
every output row of a linear weighs the same, so one scale per tensor is expected to win
(see BENCHMARKS.md for the measurement). ``hessian=None`` gives HRTN: Huffman-coded
round-to-nearest without clipping, the baseline.

Compute form after loading: decoded codes ``q + 128`` as 8-bit dense codes with zero 128
and one group per row, for ``babai::linear``; codes outside ``[−128, 127]`` go to its CSR
correction (``babai_ao.formats.outliers``) instead of being clipped.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from babai_ao.errors import BabaiError
from babai_ao.lattice.grid import Grid
from babai_ao.lattice.quantize import Certificate, QuantizedWeight, _check_weight, quantize_weight

from . import huffman, outliers
from .accounting import StoredLayer
from .packing import pack
from .search import solve_decreasing

INT8_OFFSET = 128
GAUSSIAN_ENTROPY_OFFSET = 0.5 * math.log2(2 * math.pi * math.e)  # h(N(0,σ²)) − log2 σ


@dataclass
class HPTQWeight(StoredLayer):
    """One layer in HPTQ form: the Huffman stream of its codes and its scale(s)."""

    stream: huffman.HuffmanStream
    scales: torch.Tensor  # [1] (per tensor) or [N] (per row), scale dtype
    out_features: int
    in_features: int
    certificate: Certificate

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every stored tensor (what safetensors carries)."""
        return {**self.stream.tensors("huffman_"), "scales": self.scales}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], out_features: int,
                     in_features: int) -> HPTQWeight:
        """Rebuild from stored tensors (no certificate: it is not part of the format)."""
        stream = huffman.HuffmanStream.from_tensors(tensors, "huffman_")
        if stream.num_symbols != out_features * in_features:
            raise BabaiError(f"the Huffman stream holds {stream.num_symbols} codes, expected "
                             f"{out_features}×{in_features}: the file belongs to another layer")
        return cls(stream, tensors["scales"], out_features, in_features, None)  # type: ignore[arg-type]

    @property
    def row_scales(self) -> torch.Tensor:
        return self.scales.expand(self.out_features).reshape(-1, 1)

    def codes(self) -> torch.Tensor:
        """Decoded signed codes, int64 [N, K]."""
        return huffman.decode(self.stream).reshape(self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.row_scales.to(dtype) * self.codes().to(dtype)

    def compute_form(self) -> dict[str, torch.Tensor | int]:
        """Arguments of ``babai::linear`` (8-bit codes + 128, zero 128, group = row, CSR)."""
        return compute_form(self.codes(), self.row_scales)


def compute_form(codes: torch.Tensor, row_scales: torch.Tensor) -> dict[str, torch.Tensor | int]:
    """``babai::linear`` arguments for signed codes [N, K] and scales [N, 1]."""
    n, k = codes.shape
    clamped, csr = outliers.split(codes, -INT8_OFFSET, INT8_OFFSET - 1)
    args: dict[str, torch.Tensor | int] = {
        "packed": pack(clamped + INT8_OFFSET, 8),
        "scales": row_scales.reshape(n, 1),
        "zeros": torch.full((n,), INT8_OFFSET, dtype=torch.uint8),
        "bits": 8, "group_size": k, "in_features": k}
    if csr.nnz:
        args.update(outlier_ptr=csr.ptr, outlier_idx=csr.idx, outlier_val=csr.val)
    return args


def row_factors(weight: torch.Tensor) -> torch.Tensor:
    """``ρ_n`` = row RMS / tensor RMS (1 for all-zero rows)."""
    w = weight.detach().to(torch.float32)
    rms = w.pow(2).mean(1).sqrt()
    total = float(w.pow(2).mean().sqrt())
    if total == 0:
        return torch.ones(w.shape[0])
    return torch.where(rms > 0, rms / total, torch.ones_like(rms))


def quantize_with_scale(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    scale: float,
    per_row: bool = False,
    order: str = "natural",
    damp: float = 0.01,
    chunk: int = huffman.DEFAULT_CHUNK,
    scale_dtype: torch.dtype = torch.float16,
    encode: bool = True,
    search: str = "babai",
    k: int = 16,
) -> tuple[HPTQWeight | None, QuantizedWeight, int]:
    """HPTQ at a fixed step ``scale``: ``(weight or None if not encode, the quantized codes
    with their certificate, stored bytes)``.

    ``search``/``k``: Babai or K-best (``quantize_weight``)."""
    n, cols = weight.shape
    grid = Grid(bits=8, clip=False, scale_dtype=scale_dtype)
    base = torch.tensor([float(scale)]) * (row_factors(weight) if per_row else 1.0)
    stored = grid.storable(base).to(scale_dtype)
    rows = stored.to(torch.float32).expand(n).reshape(n, 1)
    qw = quantize_weight(weight, hessian, bits=8, group_size=None, order=order, clip=False,
                         damp=damp, scales=rows, zeros=torch.zeros(n, 1),
                         scale_dtype=scale_dtype, search=search, k=k)
    nbytes = huffman.encoded_nbytes(qw.codes, chunk) + stored.numel() * stored.element_size()
    if not encode:
        return None, qw, nbytes
    out = HPTQWeight(huffman.encode(qw.codes, chunk), stored, n, cols, qw.certificate)
    out.certificate = dataclasses.replace(qw.certificate, bits_per_weight=out.bits_per_weight)
    return out, qw, nbytes


def quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor | None = None,
    target_bits: float | None = None,
    *,
    scale: float | None = None,
    per_row: bool = False,
    order: str = "natural",
    damp: float = 0.01,
    tol: float = 0.005,
    chunk: int = huffman.DEFAULT_CHUNK,
    scale_dtype: torch.dtype = torch.float16,
    search: str = "babai",
    k: int = 16,
) -> HPTQWeight:
    """HPTQ (HRTN when ``hessian is None``) of ``weight`` [N, K].

    Give ``target_bits`` (average stored bits per weight, every byte counted, hit within
    ``tol``) or a fixed ``scale`` (the step; per row it multiplies ``ρ_n``).
    ``search="kbest"``: the step is searched with Babai's codes, then K-best codes are taken
    at it and the step corrected by secant steps (K-best passes, at most ``KBEST_CORRECTIONS``)
    until their measured bits are within ``tol`` of the target.
    """
    _check_weight(weight, None)
    if (target_bits is None) == (scale is None):
        raise BabaiError("give exactly one of target_bits (e.g. 3.3) or scale")
    if scale is not None:
        return quantize_with_scale(weight, hessian, scale, per_row, order, damp, chunk,
                                   scale_dtype, search=search, k=k)[0]
    if not 0 < target_bits <= 24:
        raise BabaiError(f"target_bits={target_bits} is out of range: choose 0 < bits ≤ 24")
    numel = weight.numel()

    def bits_at(log2_s: float) -> tuple[float, float]:
        _, _, nbytes = quantize_with_scale(weight, hessian, 2.0**log2_s, per_row, order,
                                           damp, chunk, scale_dtype, encode=False)
        return 8 * nbytes / numel, log2_s

    rms = float(weight.detach().float().pow(2).mean().sqrt()) or 1.0
    x0 = math.log2(rms) + GAUSSIAN_ENTROPY_OFFSET - target_bits  # high-rate Gaussian guess
    res = solve_decreasing(bits_at, target_bits, x0=x0, slope=-1.0, tol=tol, lo=x0 - 16,
                           hi=x0 + 16, what="target_bits")
    if search != "babai" and hessian is not None:
        return _searched_at_target(weight, hessian, target_bits, res.x, per_row,
                                   order, damp, tol, chunk, scale_dtype, search, k)
    return quantize_with_scale(weight, hessian, 2.0**res.x, per_row, order, damp, chunk,
                               scale_dtype)[0]


KBEST_CORRECTIONS = 3


def _searched_at_target(weight: torch.Tensor, hessian: torch.Tensor, target_bits: float,
                        x: float, per_row: bool, order: str, damp: float,
                        tol: float, chunk: int, scale_dtype: torch.dtype, search: str, k: int
                        ) -> HPTQWeight:
    """K-best codes at the step Babai's search found, the step moved by secant steps in
    ``log2 s`` (first slope: Babai's −1 bit per doubling) until K-best's own measured bits
    are within ``tol`` of the target; the closest one seen is returned."""
    slope, prev = -1.0, None
    best: tuple[float, HPTQWeight] | None = None
    for _ in range(KBEST_CORRECTIONS):
        out = quantize_with_scale(weight, hessian, 2.0**x, per_row, order, damp, chunk,
                                  scale_dtype, search=search, k=k)[0]
        assert out is not None
        bits = out.bits_per_weight
        if best is None or abs(bits - target_bits) < abs(best[0] - target_bits):
            best = (bits, out)
        if abs(bits - target_bits) <= tol:
            break
        if prev is not None and bits != prev[1] and (bits - prev[1]) / (x - prev[0]) < 0:
            slope = (bits - prev[1]) / (x - prev[0])
        prev = (x, bits)
        x += (target_bits - bits) / slope
    assert best is not None
    return best[1]


def hrtn(weight: torch.Tensor, target_bits: float, **kwargs) -> HPTQWeight:
    """Huffman-coded round-to-nearest without clipping (HPTQ with ``H = I``)."""
    return quantize(weight, None, target_bits, **kwargs)
