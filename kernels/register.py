"""Device kernels of ``babai::linear`` / ``babai::dequantize`` (imported by ``babai_ao.ao.ops``).

* ``babai::linear_triton`` — a ``torch.library.triton_op``: under ``torch.compile`` Inductor
  sees the Triton kernels themselves (dense fused dequant-matmul, then the CSR outlier
  kernel when present). Eagerly it runs on whatever device Triton drives (CUDA, or CPU
  under ``TRITON_INTERPRET=1``).
* ``babai::linear`` on CUDA: the eager kernel calls ``linear_triton``; under the functional
  tracing that compile and AOT use, CUDA calls are rewritten to ``linear_triton`` so the
  Triton kernels become visible (export keeps ``babai::linear``, as ``triton_op`` does).
* ``babai::hptq_linear_triton`` — the HPTQ linear decoding the Huffman stream inside the
  matmul (``kernels/huffman.py``); ``babai::hptq_linear`` runs it on CUDA, and under
  compile CUDA calls become it (the same rule as ``babai::linear``).
* ``babai::dequantize`` stays one opaque op under compile on every device (its CUDA kernel
  is the standalone dequant kernel), so the post-grad pass (``passes/fuse.py``) can turn
  ``dequantize → mm`` into ``babai::linear``; decomposing it into the Triton kernel there
  would write the float weight before the pass could see the pattern.
* ``babai::linear`` on CPU: the vectorized unpack + ``mm`` of ``kernels/cpu.py``, opaque to
  compile (Inductor calls it as an extern kernel; no float weight in the graph).
"""

from __future__ import annotations

import torch
from torch._subclasses.functional_tensor import FunctionalTensorMode
from torch.library import triton_op

from babai_ao.ao import ops

from .cpu import linear_cpu
from .dequant import launch_dequant
from .huffman import decode_table, hptq_matmul
from .matmul import DECODE_MAX_M, launch_dequant_matmul
from .outliers import launch_outlier_matmul


@triton_op("babai::linear_triton", mutates_args=())
def linear_triton(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    outlier_ptr: torch.Tensor | None = None,
    outlier_idx: torch.Tensor | None = None,
    outlier_val: torch.Tensor | None = None,
    act_perm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as ``babai::linear``; Triton kernels, fp32 accumulation."""
    ops.check_packed(packed, scales, zeros, bits, group_size, in_features)
    n = packed.shape[0]
    x2 = x.reshape(-1, in_features).contiguous()
    m = x2.shape[0]
    outliers = outlier_ptr is not None
    if m <= DECODE_MAX_M or outliers:  # split-K atomics / outlier adds need an fp32 buffer
        acc = torch.zeros((m, n), dtype=torch.float32, device=x.device)
    else:
        acc = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m > 0:
        launch_dequant_matmul(x2, packed, scales, zeros, bias, act_perm, bits, group_size,
                              in_features, acc)
        if outliers:
            launch_outlier_matmul(x2, act_perm, outlier_ptr, outlier_idx, outlier_val, scales,
                                  group_size, acc)
    return acc.to(x.dtype).reshape(*x.shape[:-1], n)


@triton_op("babai::dequantize_triton", mutates_args=())
def dequantize_triton(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
    outlier_ptr: torch.Tensor | None = None,
    outlier_idx: torch.Tensor | None = None,
    outlier_val: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Same contract as ``babai::dequantize``, with the standalone dequant kernel."""
    ops.check_packed(packed, scales, zeros, bits, group_size, in_features)
    w = torch.empty((packed.shape[0], in_features), dtype=dtype, device=packed.device)
    if w.numel():
        launch_dequant(packed, scales, zeros, bits, group_size, w, outlier_ptr, outlier_idx,
                       outlier_val)
    return w


@triton_op("babai::hptq_linear_triton", mutates_args=())
def hptq_linear_triton(
    x: torch.Tensor,
    bitstream: torch.Tensor,
    symbols: torch.Tensor,
    lengths: torch.Tensor,
    offsets: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    in_features: int,
    chunk: int,
    max_len: int,
) -> torch.Tensor:
    """Same contract as ``babai::hptq_linear``; the weight is never decoded to memory."""
    ops.check_hptq(x, scale, out_features, in_features, max_len)
    table = decode_table(symbols, lengths, max_len)
    y = hptq_matmul(x.reshape(-1, in_features), bitstream, offsets, table, scale,
                    out_features, chunk, max_len)
    if bias is not None:
        y += bias.to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features)


@ops.hptq_linear.register_kernel("cuda")
def _hptq_linear_cuda(*args, **kwargs):
    return torch.ops.babai.hptq_linear_triton(*args, **kwargs)


@ops.linear.register_kernel("cuda")
def _linear_cuda(*args, **kwargs):
    return torch.ops.babai.linear_triton(*args, **kwargs)


@ops.dequantize.register_kernel("cuda")
def _dequantize_cuda(*args, **kwargs):
    return torch.ops.babai.dequantize_triton(*args, **kwargs)


@ops.linear.register_kernel("cpu")
def _linear_cpu(*args, **kwargs):
    return linear_cpu(*args, **kwargs)


def _export_keeps_triton_ops() -> bool:
    """True inside ``torch.export`` (which keeps custom ops whole); False on torch builds
    without the switch."""
    try:
        from torch.export._trace import custom_triton_ops_decomposition_disabled
    except ImportError:
        return False
    return custom_triton_ops_decomposition_disabled()


def _triton_on_cuda(triton_packet):
    """FunctionalTensorMode rule: CUDA calls become the triton_op (which then decomposes
    into its kernels for Inductor); others stay one opaque op."""

    def rule(mode, op, types, args, kwargs):
        first = args[0] if args else next(iter(kwargs.values()))
        if first.device.type == "cuda" and not _export_keeps_triton_ops():
            with mode:
                return triton_packet(*args, **kwargs)
        return mode.__torch_dispatch__(op, types, args, kwargs)

    return rule


ops.linear.register_torch_dispatch(FunctionalTensorMode,
                                   _triton_on_cuda(torch.ops.babai.linear_triton))
ops.hptq_linear.register_torch_dispatch(FunctionalTensorMode,
                                        _triton_on_cuda(torch.ops.babai.hptq_linear_triton))
