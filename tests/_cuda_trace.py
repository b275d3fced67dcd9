"""Trace babai's ops as ``torch.compile`` would on CUDA, on a machine without a GPU.

Run as a script (``python tests/_cuda_trace.py``): it prints one JSON object, scenario name
→ summary of the AOT forward graph (Inductor's decompositions, the graph its post-grad
passes receive). Inputs are fake CUDA tensors; without a GPU a stand-in Triton driver
reports an sm_90 target so ``triton_op`` / ``wrap_triton`` trace as they do on a real one.
No kernel is compiled or launched. ``TRITON_INTERPRET`` must be unset (the interpreter
would turn the kernels into CPU calls), which is why ``test_kernels_cuda_trace.py`` runs
this in a fresh process.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402


class _FakeCudaDriver:
    """Just enough of a Triton driver for tracing: a target, and the torch device."""

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cuda")


if not torch.cuda.is_available():
    triton.runtime.driver.set_active(_FakeCudaDriver())

import babai_ao.kernels  # noqa: E402,F401
import torch.nn.functional as F  # noqa: E402
from _kernels_util import random_layer  # noqa: E402
from babai_ao.passes.check import assert_no_float_weight  # noqa: E402
from babai_ao.passes.fuse import rewrite_dequant_matmul  # noqa: E402
from functorch.compile import aot_function  # noqa: E402
from torch._inductor.decomposition import select_decomp_table  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from babai_ao.ao.tensor import BabaiQuantizedTensor  # noqa: E402
from babai_ao.formats import huffman  # noqa: E402

_MODE = FakeTensorMode(allow_non_fake_inputs=True)


class _Traced(Exception):
    pass


def _cuda(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    with _MODE:
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda")


def _summary(gm: torch.fx.GraphModule) -> dict:
    """Targets of the graph's calls; for Triton HOPs, the kernel and what it clones."""
    ops, kernels, clones = [], [], []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(node.target)
        if name.startswith("triton_kernel_wrapper"):
            from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            kernel = getattr(kernel, "fn", kernel)  # Autotuner → JITFunction
            kernels.append(kernel.__name__)
            clones.append(sorted(node.kwargs.get("tensors_to_clone", [])))
        ops.append(name)
    return {"ops": ops, "kernels": kernels, "clones": clones}


def trace(fn, *args) -> torch.fx.GraphModule:
    """The AOT forward graph of ``fn(*args)`` with Inductor's decompositions."""
    graphs = []

    def capture(gm, _inputs):
        graphs.append(gm)
        raise _Traced

    with contextlib.suppress(_Traced):
        aot_function(fn, fw_compiler=capture, decompositions=select_decomp_table())(*args)
    return graphs[0]


def _linear_args(m: int, outliers: bool, dtype=torch.float16) -> tuple[list, dict]:
    layer = random_layer(4, 64, 40, 128, outliers, seed=m)
    x = _cuda(torch.randn(m, 128, dtype=dtype))
    names = ["packed", "scales", "zeros", "outlier_ptr", "outlier_idx", "outlier_val"]
    tensors = [_cuda(layer.get(k)) for k in names]
    return [x, *tensors], layer


def scenarios() -> dict[str, dict]:
    out = {}
    for label, m, outliers in (("decode", 1, False), ("prefill", 32, False),
                               ("outliers", 4, True)):
        args, layer = _linear_args(m, outliers)
        if not outliers:
            args = args[:4]

        def f(x, packed, scales, zeros, *o, _layer=layer):
            return torch.ops.babai.linear(x, packed, scales, zeros, None, _layer["bits"],
                                          _layer["group_size"], _layer["in_features"], *o)

        out[f"linear_{label}"] = _summary(trace(f, *args))

    st = huffman.encode(torch.randint(-6, 7, (40 * 96,)), chunk=256)
    h_args = [_cuda(t) for t in (torch.randn(2, 96, dtype=torch.float16), st.bitstream,
                                 st.symbols, st.lengths, st.offsets, torch.tensor(0.01))]

    chunk, max_len = st.chunk, st.max_len

    def h(x, bitstream, symbols, lengths, offsets, scale):
        return torch.ops.babai.hptq_linear(x, bitstream, symbols, lengths, offsets, scale,
                                           None, 40, 96, chunk, max_len)

    out["hptq_linear"] = _summary(trace(h, *h_args))

    (x, packed, scales, zeros, *_), layer = _linear_args(3, False, torch.bfloat16)
    bias = _cuda(torch.randn(40, dtype=torch.bfloat16))
    with _MODE:
        weight = BabaiQuantizedTensor(packed, scales, zeros, 4, 64, torch.Size([40, 128]),
                                      torch.bfloat16)
    out["subclass_linear"] = _summary(trace(lambda x, w, b: F.linear(x, w, b), x, weight, bias))

    def d(x, packed, scales, zeros, b):
        w = torch.ops.babai.dequantize(packed, scales, zeros, 4, 64, 128, dtype=torch.bfloat16)
        return F.linear(x, w, b)

    gm = trace(d, x, packed, scales, zeros, bias)
    before = _summary(gm)
    rewritten = rewrite_dequant_matmul(gm.graph)
    after = _summary(gm)
    try:
        assert_no_float_weight(gm.graph, layers=[(40, 128)])
        after["no_float_weight"] = True
    except AssertionError as e:
        after["no_float_weight"] = str(e)
    out["dequantize_linear"] = {"before": before, "rewritten": rewritten, "after": after}
    return out


if __name__ == "__main__":
    sys.stdout.write(json.dumps(scenarios()) + "\n")
