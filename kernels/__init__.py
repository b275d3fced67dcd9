"""Kernels for the packed babai-ao format (torch + triton only; no torchao at import).

``bits`` (reading b-bit codes in Triton), ``matmul`` (fused dequant-matmul, decode and
prefill tunings), ``outliers`` (SSQR CSR correction), ``dequant`` (standalone dequant),
``huffman`` (HPTQ stream decode, and the matmul decoding it in-kernel), ``cpu`` (vectorized
CPU path), ``cpu_int4`` (torch's int4pack kernel for 4-bit bf16), ``register`` (the
``babai::`` op registrations).

This directory is installed as ``babai_ao.kernels``. From a checkout with the repository
root on ``sys.path`` (``python -m pytest``), a library probing for the PyPI ``kernels``
package (transformers does) imports it as top-level ``kernels``: under that name it stays
inert, so the ops are never registered twice from two copies of these modules.
"""

from __future__ import annotations

if __name__ == "babai_ao.kernels":
    from . import register
    from .cpu import linear_cpu
    from .register import dequantize_triton, hptq_linear_triton, linear_triton

    __all__ = ["dequantize_triton", "hptq_linear_triton", "linear_cpu", "linear_triton",
               "register"]
