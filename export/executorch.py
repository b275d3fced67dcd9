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

Quantized embeddings (``babai::embedding``, ``babai_ao.ao.ops``), in both modes, become the
runtime's ``quantized_decomposed::embedding_4bit`` / ``embedding_2bit`` / ``embedding_byte``
kernels on re-laid-out constants (``quantized_embeddings``: nibble order, signed codes,
float32 scales and zero points; the lookup is exact), 3-bit tables an ATen gather + unpack.
A tied lm_head is a ``babai::linear`` like any other (8da4w or exact weight-only), so the
program holds the table twice at 4 bits and never in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from babai_ao.kernels.cpu_int4 import exact_forwards

from babai_ao.errors import BabaiError

from .decompose import (
    babai_embedding_nodes,
    babai_linear_nodes,
    constant_of,
    dequantize_op,
    exact_dequantize,
    exact_embedding,
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
    from babai_ao.formats.packing import unpack

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


def _embedding_layout(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      bits: int, group_size: int, dim: int, dtype: torch.dtype):
    """``(op, weight, scales, zero_points, qmin, qmax)`` for ExecuTorch's quantized embedding
    kernels, or ``None`` where none fits (3 bit; rows not a whole number of bytes).

    ``embedding_4bit`` reads two codes per byte high nibble first and ``embedding_2bit`` four
    per byte low bits first, both as signed ``code − 2^(b−1)``; ``embedding_byte`` takes the
    uint8 codes as they are. Zero points are shifted the same way, so ``(q − z)·s`` is
    unchanged; all-midpoint zeros (a symmetric grid) are left out. The kernels want scales,
    zero points and output in one dtype: both are stored in the output dtype (float32: the
    fp16 scales convert exactly, and the rows equal eager's bit for bit).
    """
    from babai_ao.formats.packed_weight import zero_codes

    if bits not in (2, 4, 8) or (dim * bits) % 8:
        return None
    qd = torch.ops.quantized_decomposed
    n, groups = packed.shape[0], dim // group_size
    scales = scales.to(dtype)  # exact (fp16 -> fp32); the kernels want scales, zeros, output alike
    w = packed[:, :dim * bits // 8].contiguous()
    z = zero_codes(zeros, bits, torch.arange(n), groups)
    if bits == 8:
        return qd.embedding_byte.dtype, w, scales, z.to(dtype), 0, 255
    mid = 1 << (bits - 1)
    zp = None if bool((z == mid).all()) else (z - mid).to(dtype)
    if bits == 4:
        w = ((w & 0x0F) << 4) | (w >> 4)  # low nibble first -> high nibble first
        return qd.embedding_4bit.dtype, w.contiguous(), scales, zp, -8, 7
    return qd.embedding_2bit.dtype, w, scales, zp, -2, 1


def quantized_embeddings(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Replace each ``babai::embedding`` by ExecuTorch's ``quantized_decomposed`` embedding
    kernel on re-laid-out constants (in place; packed originals no op reads are dropped).
    Embeddings no kernel fits stay for the ``exact_embedding`` decomposition."""
    import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401  (op schemas)
    from executorch.backends.transforms.utils import (
        create_constant_placeholder,
        delete_constant_placeholder,
    )
    from torch.export.graph_signature import InputKind

    nodes = babai_embedding_nodes(ep)
    if not nodes:
        return ep
    graph = ep.graph
    first = next(n for n in graph.nodes if n.op == "placeholder")
    olds: set[torch.fx.Node] = set()
    for i, node in enumerate(nodes):
        indices, packed, scales, zeros, bits, group_size, dim = node.args[:7]
        dtype = node.args[7] if len(node.args) > 7 else node.kwargs.get("dtype", torch.float32)
        real = [constant_of(ep, a) for a in (packed, scales, zeros)]
        if any(t is None for t in real):
            raise BabaiError("a quantized embedding needs its packed table as model "
                             "constants (buffers or parameters), not computed tensors")
        layout = _embedding_layout(*real, bits, group_size, dim, dtype)
        if layout is None:
            continue
        op, w, s, zp, qmin, qmax = layout
        with graph.inserting_before(first):
            consts = [None if t is None else create_constant_placeholder(
                ep, graph, f"babai_embedding_{i}_{name}", InputKind.CONSTANT_TENSOR, t)
                for name, t in (("weight", w), ("scales", s), ("zero_points", zp))]
        with graph.inserting_before(node):
            new = graph.call_function(op, (*consts, qmin, qmax, indices), {"dtype": dtype})
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        olds.update(a for a in (packed, scales, zeros))
    for old in olds:
        if not old.users:
            delete_constant_placeholder(ep, old)
    ep.graph_module.recompile()
    return ep


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
    ep = quantized_embeddings(with_plain_constants(ep))
    deq = dequantize_op()
    emb = {torch.ops.babai.embedding.default: exact_embedding} if babai_embedding_nodes(ep) \
        else {}
    if mode == "8da4w":
        table = {torch.ops.babai.linear.default: make_linear_8da4w(_check_8da4w(ep)), **emb}
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
        table = {torch.ops.babai.linear.default: exact_linear, **emb}
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
    import executorch.kernels.quantized  # noqa: F401  (quantized_decomposed embedding kernels)
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
        with torch.no_grad(), exact_forwards():  # the model's own numbers, as exported
            ref = flat_outputs(model(*example_inputs))
        got = run_pte(load_method(path), example_inputs)
        report.max_abs_diff, report.max_abs_ref = max_diff(got, ref)
    return report
