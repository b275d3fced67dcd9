"""Kernels for the packed babai-ao format (torch + triton only; no torchao at import).

``bits`` (reading b-bit codes in Triton), ``matmul`` (fused dequant-matmul, decode and
prefill tunings), ``outliers`` (SSQR CSR correction), ``dequant`` (standalone dequant),
``cpu`` (vectorized CPU path), ``register`` (the ``babai::`` op registrations).
"""

from __future__ import annotations

from . import register
from .cpu import linear_cpu
from .register import dequantize_triton, linear_triton

__all__ = ["dequantize_triton", "linear_cpu", "linear_triton", "register"]
