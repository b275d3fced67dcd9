"""``to_executorch``: quantized models to an ExecuTorch ``.pte`` (XNNPACK + portable ops).

``torch.export`` keeps each ``babai::linear`` whole; ``run_decompositions`` with that one
entry rewrites it (``decompose``):

- ``mode="weight_only"`` (any bit-width): the packed bytes stay in the program and are
  unpacked and dequantized by portable ATen ops on every call; the float32 matmul runs in
  XNNPACK (``force_non_static_weights_for_f32_linear``, the weight being computed). Same
  float operations as eager: exact up to the matmul's summation order. Slow (no fused
  kernel).
- ``mode="8da4w"`` (4-bit layers only: XNNPACK refuses 2/3/8-bit groups with int8
  activations): torchao's dynamic int8 activation × int4 group weight pattern, constant-
  folded to int8-held codes that XNNPACK packs to 4 bits and runs fused. Activations are
  rounded to int8 per token, so outputs move by up to ``½·s_x·Σ_k |W[n, k]|``.

XNNPACK's weight-only group-dequantize pattern is never used: it drops the dequantize without
error and multiplies raw codes. HPTQ's compute form (dense 8-bit codes, zero 128, one scale
per row) is exported as an 8-bit layer (weight-only). Every export can run its ``.pte`` once and report the
difference to eager; check it (the tests do).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from babai_ao.errors import BabaiError

from .decompose import (
    babai_linear_nodes,
    constant_of,
    dequantize_op,
    exact_dequantize,
    exact_linear,
    make_linear_8da4w,
    with_plain_constants,
)
from .modules import plain_buffers
from .report import ExportReport, flat_outputs, max_diff

MODES = ("weight_only", "8da4w")
_BITS, _ZEROS = 5, 3  # positions of ``bits`` and ``zeros`` in babai::linear's arguments


def _zeros_symmetric(ep: torch.export.ExportedProgram, node: torch.fx.Node) -> bool:
    """Whether every group zero of a 4-bit layer is 8 (the symmetric grid XNNPACK assumes)."""
    from babai_ao.packing import unpack

    packed, zeros = constant_of(ep, node.args[1]), constant_of(ep, node.args[_ZEROS])
    if packed is None or zeros is None:
        raise BabaiError("8da4w needs the packed weights as model constants (buffers or "
                         "parameters), not computed tensors")
    group_size, in_features = node.args[_BITS + 1], node.args[_BITS + 2]
    n_zeros = packed.shape[0] * (in_features // group_size)
    return bool((unpack(zeros.reshape(1, -1), 4, n_zeros) == 8).all())


def _check_8da4w(ep: torch.export.ExportedProgram) -> bool:
    """Refuse non-4-bit layers; return whether any layer needs the zero-point correction."""
    nodes = babai_linear_nodes(ep)
    bad = sorted({n.args[_BITS] for n in nodes if n.args[_BITS] != 4})
    if bad:
        raise BabaiError(f"mode='8da4w' takes 4-bit layers only (XNNPACK has no int8-activation "
                         f"kernel for {bad}-bit groups): use mode='weight_only' or quantize "
                         "every linear at 4 bits")
    return not all(_zeros_symmetric(ep, n) for n in nodes)


def lower(ep: torch.export.ExportedProgram, mode: str = "weight_only",
          init_buffers: Sequence[str] = (), xnnpack: bool = True):
    """An ``ExecutorchProgramManager`` for ``ep`` (``.buffer`` holds the ``.pte`` bytes).

    ``xnnpack=False`` (weight-only only) keeps every op portable: slower to run, faster to
    lower (no delegate preprocessing), same numbers up to summation order.

    Mutable buffers whose names contain one of ``init_buffers`` keep their initial values in
    the program (ExecuTorch otherwise serializes mutated buffers uninitialized).
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import (
        EdgeCompileConfig,
        ExecutorchBackendConfig,
        to_edge_transform_and_lower,
    )
    from executorch.exir.passes.constant_prop_pass import constant_prop_pass
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass

    if mode not in MODES:
        raise BabaiError(f"unknown ExecuTorch mode {mode!r}: choose one of {MODES}")
    ep = with_plain_constants(ep)
    deq = dequantize_op()
    if mode == "8da4w":
        table = {torch.ops.babai.linear.default: make_linear_8da4w(_check_8da4w(ep))}
        if deq is not None and any(n.target == deq for n in ep.graph.nodes):
            raise BabaiError("mode='8da4w' cannot keep a babai::dequantize weight packed: "
                             "use mode='weight_only'")
        ep = ep.run_decompositions(table)
        ao = torch.ops.torchao
        ep = constant_prop_pass(ep, custom_skip_targets={
            ao.choose_qparams_affine.default, ao.quantize_affine.default,
            ao.dequantize_affine.default})
        partitioner = XnnpackPartitioner()
    else:
        table = {torch.ops.babai.linear.default: exact_linear}
        if deq is not None:
            table[deq] = exact_dequantize
        ep = ep.run_decompositions(table)
        partitioner = XnnpackPartitioner(force_non_static_weights_for_f32_linear=True)
    if mode == "8da4w" and not xnnpack:
        raise BabaiError("mode='8da4w' runs only in XNNPACK: keep xnnpack=True")
    shifts = [torch.ops.aten.bitwise_right_shift.Tensor, torch.ops.aten.bitwise_left_shift.Tensor]
    edge = to_edge_transform_and_lower(
        ep, partitioner=[partitioner] if xnnpack else None,
        compile_config=EdgeCompileConfig(_core_aten_ops_exception_list=shifts))
    passes = [InitializedMutableBufferPass(list(init_buffers))] if init_buffers else []
    return edge.to_executorch(ExecutorchBackendConfig(passes=passes))


def load_method(path: str | Path, name: str = "forward"):
    """A loaded method of a ``.pte`` in the ExecuTorch Python runtime (keeps its state)."""
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(str(path))
    method = program.load_method(name)
    if method is None:
        raise BabaiError(f"{path} has no method {name!r}")
    return method


def run_pte(method, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone() for t in method.execute(list(inputs))]


def to_executorch(model: torch.nn.Module, example_inputs: Sequence[torch.Tensor],
                  path: str | Path, mode: str = "weight_only", verify: bool = True
                  ) -> ExportReport:
    """Export ``model`` (with ``babai::linear`` layers) to a ``.pte``; optionally run it once."""
    example_inputs = tuple(example_inputs)
    with torch.no_grad(), plain_buffers(model):
        ep = torch.export.export(model, example_inputs, strict=False)
    n_q = len(babai_linear_nodes(ep))
    program = lower(ep, mode)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(program.buffer)
    report = ExportReport(path=path, target="executorch", mode=mode,
                          size_bytes=path.stat().st_size, quantized_linears=n_q)
    if verify:
        with torch.no_grad():
            ref = flat_outputs(model(*example_inputs))
        got = run_pte(load_method(path), example_inputs)
        report.max_abs_diff, report.max_abs_ref = max_diff(got, ref)
    return report
