"""What ``torch.compile`` sees of babai's ops on CUDA, checked on a machine without a GPU.

``_cuda_trace.py`` traces each op with fake CUDA tensors (Inductor's decompositions, no
kernel compiled or run) in a fresh process, without ``TRITON_INTERPRET``. Asserted here:
the Triton kernels themselves reach the graph (so Inductor schedules them), their mutation
analysis succeeds (it compiles each kernel to TTIR for sm_90: only the output is cloned, not
"every input"), the HPTQ path has static shapes, and ``dequantize → linear`` stays one opaque
``babai::dequantize`` that the post-grad pass turns into ``babai::linear``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from _kernels_util import run_compiled_triton

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def traced() -> dict:
    path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    proc = run_compiled_triton([str(HERE / "_cuda_trace.py")], env={"PYTHONPATH": path})
    assert proc.returncode == 0, proc.stderr[-4000:]
    # a kernel that does not compile for the GPU makes torch fall back to cloning every input
    assert "Encountered an exception in identify_accessed_tensors" not in proc.stderr, (
        proc.stderr[-4000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name,kernels,clones", [
    ("linear_decode", ["_dequant_matmul"], [["out_ptr"]]),
    ("linear_prefill", ["_dequant_matmul"], [["out_ptr"]]),
    ("linear_outliers", ["_dequant_matmul", "_outlier_matmul"], [["out_ptr"], ["out_ptr"]]),
    ("subclass_linear", ["_dequant_matmul"], [["out_ptr"]]),
    ("hptq_linear", ["_hptq_matmul"], [["y_ptr"]]),
])
def test_compile_on_cuda_sees_the_triton_kernels(traced, name, kernels, clones):
    graph = traced[name]
    assert graph["kernels"] == kernels
    assert graph["clones"] == clones  # only the output buffer: mutation analysis worked
    assert not any(op.startswith("babai.") for op in graph["ops"]), graph["ops"]
    # no float matmul beside the kernels: the weight is never built
    assert not any(op.split(".")[1] in ("mm", "addmm", "bmm") for op in graph["ops"]
                   if op.startswith("aten.")), graph["ops"]


def test_prefill_writes_its_output_dtype_directly(traced):
    """Prefill (M > 16, no split-K) allocates the output uninitialized; decode zero-fills
    an fp32 buffer for its atomics."""
    assert "aten.empty.memory_format" in traced["linear_prefill"]["ops"]
    assert "aten.full.default" in traced["linear_decode"]["ops"]


def test_dequantize_stays_opaque_for_the_post_grad_pass(traced):
    graph = traced["dequantize_linear"]
    assert graph["before"]["ops"][0] == "babai.dequantize.default"
    assert graph["before"]["kernels"] == []  # not decomposed into the dequant kernel
    assert graph["rewritten"] == 1
    assert graph["after"]["ops"] == ["babai.linear.default"]  # bias folded in, no addmm
    assert graph["after"]["no_float_weight"] is True
