"""Unbounded integer codes as a dense clamped part plus a sparse CSR correction.

``q = clamp(q, lo, hi) + δ`` with ``δ = q − clamp(q, lo, hi)``, nonzero only where ``q`` left
``[lo, hi]``. ``δ`` is stored row-compressed: ``ptr`` int32 [N+1] (row ``n``'s entries are
``ptr[n] … ptr[n+1]−1``), ``idx`` column indices (int16 when ``K ≤ 32768``, else int32),
``val`` the deltas in the narrowest of int8/int16/int32 that holds them. Then
``W = s·(clamp(q) − z) + s·δ`` — the form ``babai::linear`` takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from babai_ao.errors import BabaiError


@dataclass
class CSR:
    """Sparse integer correction ``δ`` [N, K] in CSR form."""

    ptr: torch.Tensor  # int32 [N+1]
    idx: torch.Tensor  # int16/int32 [nnz]
    val: torch.Tensor  # int8/int16/int32 [nnz]

    @property
    def nnz(self) -> int:
        return int(self.idx.numel())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.ptr, self.idx, self.val))

    def dense(self, shape: tuple[int, int]) -> torch.Tensor:
        """``δ`` as a dense int64 matrix (tests and reference only)."""
        out = torch.zeros(shape, dtype=torch.int64)
        rows = torch.repeat_interleave(torch.arange(shape[0]), (self.ptr[1:] - self.ptr[:-1]).long())
        out[rows, self.idx.long()] = self.val.long()
        return out


def narrowest_int(lo: int, hi: int) -> torch.dtype:
    """Smallest signed integer dtype holding ``[lo, hi]``."""
    for dtype in (torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return dtype
    raise BabaiError(f"integer range [{lo}, {hi}] does not fit int32: use a coarser scale")


def csr_nbytes(n_rows: int, n_cols: int, nnz: int, val_dtype: torch.dtype) -> int:
    """Bytes of a CSR correction with ``nnz`` entries (without building it)."""
    idx_bytes = 2 if n_cols <= 2**15 else 4
    return 4 * (n_rows + 1) + nnz * (idx_bytes + torch.empty(0, dtype=val_dtype).element_size())


def split(codes: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, CSR]:
    """``(clamp(codes, lo, hi), δ as CSR)`` for integer ``codes`` [N, K]."""
    if codes.dim() != 2:
        raise BabaiError(f"codes must be 2-D [N, K], got shape {tuple(codes.shape)}")
    codes = codes.to(torch.int64)
    clamped = codes.clamp(lo, hi)
    delta = codes - clamped
    rows, cols = torch.nonzero(delta, as_tuple=True)  # row-major: already CSR order
    vals = delta[rows, cols]
    n, k = codes.shape
    counts = torch.bincount(rows, minlength=n)
    ptr = torch.zeros(n + 1, dtype=torch.int64, device=codes.device)
    ptr[1:] = torch.cumsum(counts, 0)
    if int(ptr[-1]) >= 2**31:
        raise BabaiError("more than 2^31 outliers: raise the scale multiplier")
    val_dtype = narrowest_int(int(vals.min()), int(vals.max())) if vals.numel() else torch.int8
    csr = CSR(ptr=ptr.to(torch.int32),
              idx=cols.to(torch.int16 if k <= 2**15 else torch.int32),
              val=vals.to(val_dtype))
    return clamped, csr


def merge(clamped: torch.Tensor, csr: CSR) -> torch.Tensor:
    """Inverse of ``split``: the unbounded int64 codes."""
    return clamped.to(torch.int64) + csr.dense(tuple(clamped.shape))
