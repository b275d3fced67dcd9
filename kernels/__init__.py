"""Kernels for the packed babai-ao format (torch + triton only; no torchao at import).

``bits`` (reading b-bit codes in Triton), ``matmul`` (fused dequant-matmul, decode and
prefill tunings), ``outliers`` (SSQR CSR correction), ``dequant`` (standalone dequant),
``huffman`` (HPTQ stream decode, and the matmul decoding it in-kernel), ``cpu`` (vectorized
CPU path), ``cpu_int4`` (torch's int4pack kernel for 4-bit bf16), ``cpu_hptq`` (HPTQ on
CPU: each group's 16-code window as nibbles plus a sparse correction, in the C++ op of
``csrc/hptq_linear.cpp``), ``cpp_ops`` (builds and loads the ``babai_cpu::`` C++ ops on first
use), ``register`` (the ``babai::`` op registrations).

This folder is installed as ``babai_ao.kernels``. Imported as top-level ``kernels`` (the
repository root on ``sys.path``), it hands over to the installed PyPI ``kernels``, which
transformers imports (``babai_ao._root_folders``).
"""

from __future__ import annotations

if __name__ != "babai_ao.kernels":
    import os as _os
    import runpy as _runpy

    # run the helper file alone: importing babai_ao here, in the middle of the importer's
    # own import (transformers' modeling_utils imports kernels), would re-enter it
    _helper = _os.path.join(_os.path.dirname(__file__), _os.pardir, "babai_ao", "_root_folders.py")
    _runpy.run_path(_helper)["hand_over"](__name__, __file__)
else:
    from . import register
    from .cpu import linear_cpu
    from .register import dequantize_triton, hptq_linear_triton, linear_triton

    __all__ = ["dequantize_triton", "hptq_linear_triton", "linear_cpu", "linear_triton",
               "register"]
