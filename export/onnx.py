"""``to_onnx``: quantized models to ONNX with the weights kept quantized.

``torch.export`` gives the graph; ``torch.onnx.export(dynamo=True)`` translates it with a
custom translation for ``babai::linear``. Translations see initializers only symbolically, so
the translation closes over the exported program's real constants and emits re-laid-out
quantized initializers (Constant nodes, stored like initializers; the packed originals are
dropped as unused). Per layer, ``x @ Wᵀ`` becomes:

- ``format="qdq"``, 4/8 bit: opset-21 ``DequantizeLinear`` of a UINT4/UINT8 ``[K, N]``
  initializer (blocks of ``g`` along axis 0, per-block scale and zero point) feeding
  ``MatMul`` — the pattern ONNX Runtime fuses into ``MatMulNBits``;
- ``format="matmulnbits"``, 2/4/8 bit: ``com.microsoft.MatMulNBits`` on our packed bytes
  (same little-endian layout) with packed per-row zero points;
- otherwise (3 bit; 2 bit with ``qdq``): the packed bytes stay at ``b`` bits per weight and
  are unpacked in the graph (``BitShift``/``BitwiseAnd``/``BitwiseOr``) to uint8 codes for a
  ``DequantizeLinear`` on ``[N, K]`` (axis 1) — portable and exact, not fused.

SSQR outliers: ``y[..., n] += Σ_j x[..., idx_j] · s[n, idx_j//g] · δ_j`` with ``Gather``,
``Mul`` and ``ScatterElements(reduction="add")``; CSR rows are rebuilt in the graph from the
row pointers, so outliers cost what they cost in storage. HPTQ reaches this as its compute
form: dense 8-bit codes (zero 128) with per-row scales, exported as the 8-bit case.
``DequantizeLinear`` computes ``(q − z) · s`` in float32, the same operations as eager.

Quantized embeddings (``babai::embedding``, ``babai_ao.ao.ops``) become ONNX Runtime's
``com.microsoft.GatherBlockQuantized`` (uint8 data at 2/4/8 bits packed low bits first —
our layout —, float32 scales, zero points packed per row; blocks a power of two ≥ 16): with
``format="matmulnbits"`` it reads MatMulNBits' ``[N, G, g·b/8]`` bytes (``quantize_axis=2``),
so a tied lm_head and the table are one initializer; with ``qdq`` the table is stored
``[N, K·b/8]`` next to the lm_head's transposed UINT4 copy. Other widths and group sizes:
``Gather`` of the packed rows, in-graph unpack, ``DequantizeLinear`` of those rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from babai_ao.kernels.cpu_int4 import exact_forwards

from babai_ao.errors import BabaiError
from babai_ao.formats.packing import unpack

from .decompose import (
    babai_embedding_nodes,
    babai_linear_nodes,
    constant_of,
    with_plain_constants,
)
from .modules import plain_buffers
from .report import ExportReport, flat_outputs, max_diff

FORMATS = ("qdq", "matmulnbits")
OPSET = 21
_FLOAT = 1  # onnx TensorProto.FLOAT


def register_matmulnbits_schema() -> None:
    """Make ``com.microsoft.MatMulNBits`` (ONNX Runtime contrib op) known to onnx/onnxscript."""
    import onnx

    if onnx.defs.has("MatMulNBits", "com.microsoft"):
        return
    S = onnx.defs.OpSchema
    opt = S.FormalParameterOption.Optional
    inputs = [S.FormalParameter("A", "T1"), S.FormalParameter("B", "T2"),
              S.FormalParameter("scales", "T1"),
              S.FormalParameter("zero_points", "T3", param_option=opt),
              S.FormalParameter("g_idx", "T4", param_option=opt),
              S.FormalParameter("bias", "T1", param_option=opt)]
    attrs = [S.Attribute("K", S.AttrType.INT), S.Attribute("N", S.AttrType.INT),
             S.Attribute("bits", S.AttrType.INT), S.Attribute("block_size", S.AttrType.INT),
             S.Attribute("accuracy_level", S.AttrType.INT, required=False)]
    types = [("T1", ["tensor(float)", "tensor(float16)"], ""),
             ("T2", ["tensor(uint8)", "tensor(int32)"], ""),
             ("T3", ["tensor(uint8)", "tensor(int32)", "tensor(float)", "tensor(float16)"], ""),
             ("T4", ["tensor(int32)"], "")]
    onnx.defs.register_schema(S("MatMulNBits", "com.microsoft", 1, inputs=inputs,
                                outputs=[S.FormalParameter("Y", "T1")],
                                type_constraints=types, attributes=attrs))


def register_gather_block_quantized_schema() -> None:
    """Make ``com.microsoft.GatherBlockQuantized`` (ONNX Runtime contrib op) known to onnx."""
    import onnx

    if onnx.defs.has("GatherBlockQuantized", "com.microsoft"):
        return
    S = onnx.defs.OpSchema
    opt = S.FormalParameterOption.Optional
    inputs = [S.FormalParameter("data", "T1"), S.FormalParameter("indices", "Tind"),
              S.FormalParameter("scales", "T2"),
              S.FormalParameter("zero_points", "T1", param_option=opt)]
    attrs = [S.Attribute(name, S.AttrType.INT, required=False)
             for name in ("bits", "block_size", "gather_axis", "quantize_axis")]
    types = [("T1", ["tensor(uint8)", "tensor(uint4)", "tensor(int4)"], ""),
             ("T2", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
             ("Tind", ["tensor(int32)", "tensor(int64)"], "")]
    onnx.defs.register_schema(S("GatherBlockQuantized", "com.microsoft", 1, inputs=inputs,
                                outputs=[S.FormalParameter("output", "T2")],
                                type_constraints=types, attributes=attrs))


def gather_block_quantized_fits(bits: int, group_size: int, dim: int) -> bool:
    """Whether ORT's ``GatherBlockQuantized`` takes the table: uint8 data at 2/4/8 bits, rows a
    whole number of bytes, blocks a power of two ≥ 16 (else: Gather + unpack + Dequantize)."""
    return (bits in (2, 4, 8) and (dim * bits) % 8 == 0 and group_size >= 16
            and group_size & (group_size - 1) == 0)


def _pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 codes [R, C] (b ∈ {2, 4, 8}) little-endian per row, rows padded to a byte."""
    per = 8 // bits
    r, c = codes.shape
    padded = np.zeros((r, -(-c // per) * per), np.uint8)
    padded[:, :c] = codes
    groups = padded.reshape(r, -1, per).astype(np.uint32)
    return (groups << (np.arange(per, dtype=np.uint32) * bits)).sum(-1).astype(np.uint8)


def _make_translation(consts: dict[str, torch.Tensor], fmt: str, accuracy_level: int
                      ) -> Callable[..., Any]:
    import onnx_ir as ir
    from onnxscript import opset21 as op
    from onnxscript.values import Opset

    msft = Opset("com.microsoft", 1)

    def c(array, dtype=None):
        """A Constant node (ONNX Runtime loads it as an initializer)."""
        if not isinstance(array, np.ndarray) and hasattr(array, "dtype"):
            return op.Constant(value=array)  # an onnx_ir tensor (packed sub-byte types)
        return op.Constant(value=ir.tensor(np.asarray(array, dtype=dtype)))

    blocks: dict[str, Any] = {}  # packed name -> [N, G, g·b/8] bytes (shared by a tied table)

    def block_bytes(packed, n: int, groups: int, nbytes: int):
        """MatMulNBits' B: the packed rows as blocks, one Constant per packed tensor."""
        if packed.name not in blocks:
            blocks[packed.name] = c(real(packed).numpy().reshape(n, groups, nbytes))
        return blocks[packed.name]

    def real(v) -> torch.Tensor:
        name = getattr(v, "name", None)
        if name not in consts:
            raise BabaiError(f"babai::linear argument {name!r} is not a model constant: "
                             "keep packed/scales/zeros/outliers as buffers or parameters")
        return consts[name]

    def unpack_in_graph(packed, bits: int, n: int, k: int):
        """uint8 codes [N, K] from packed bytes [N, nb] (module doc); ``n = -1``: any rows."""
        kp = (k + 7) // 8 * 8  # codes per row with the padding of the packing
        if 8 % bits == 0:
            shifts = c(np.arange(0, 8, bits, dtype=np.uint8))
            codes = op.BitwiseAnd(op.BitShift(op.Unsqueeze(packed, [-1]), shifts,
                                              direction="RIGHT"),
                                  c((1 << bits) - 1, np.uint8))
        else:
            runs = op.Cast(op.Reshape(packed, c([n, kp // 8, bits], np.int64)),
                           to=ir.DataType.UINT32)
            word = op.Gather(runs, c(0, np.int64), axis=-1)
            for j in range(1, bits):
                byte = op.Gather(runs, c(j, np.int64), axis=-1)
                word = op.BitwiseOr(word, op.BitShift(byte, c(8 * j, np.uint32),
                                                      direction="LEFT"))
            shifts = c(np.arange(0, 8 * bits, bits, dtype=np.uint32))
            codes = op.Cast(op.BitwiseAnd(op.BitShift(op.Unsqueeze(word, [-1]), shifts,
                                                      direction="RIGHT"),
                                          c((1 << bits) - 1, np.uint32)),
                            to=ir.DataType.UINT8)
        flat = op.Reshape(codes, c([n, kp], np.int64))
        return op.Slice(flat, c([0], np.int64), c([k], np.int64),
                        c([1], np.int64))

    def outliers(xf, scales_f, n: int, g: int, groups: int, ptr, idx, val):
        """Gather/Mul/ScatterElements(add) of the CSR correction (module doc)."""
        nnz = int(real(idx).numel())
        p = op.Cast(ptr, to=ir.DataType.INT64)
        starts = op.Slice(p, c([1], np.int64), c([n], np.int64))
        zeros = op.ConstantOfShape(c([nnz + 1], np.int64),
                                   value=ir.tensor(np.zeros(1, np.int64)))
        marks = op.ScatterElements(zeros, starts,
                                   op.Expand(c(1, np.int64), op.Shape(starts)),
                                   axis=0, reduction="add")
        rows = op.Slice(op.CumSum(marks, c(0, np.int64)), c([0], np.int64),
                        c([nnz], np.int64))
        cols = op.Cast(idx, to=ir.DataType.INT64)
        flat_s = op.Reshape(scales_f, c([-1], np.int64))
        s = op.Gather(flat_s, op.Add(op.Mul(rows, c(groups, np.int64)),
                                     op.Div(cols, c(g, np.int64))))
        contrib = op.Mul(op.Gather(xf, cols, axis=-1),
                         op.Mul(s, op.Cast(val, to=ir.DataType.FLOAT)))
        return contrib, rows

    def babai_linear(x, packed, scales, zeros, bias, bits: int, group_size: int,
                     in_features: int, outlier_ptr=None, outlier_idx=None, outlier_val=None,
                     act_perm=None):
        P = real(packed)
        n, k, g = P.shape[0], in_features, group_size
        groups = k // g
        z = unpack(real(zeros).reshape(1, -1), bits, n * groups).reshape(n, groups).numpy()
        s16 = real(scales)
        xf = x if x.dtype == ir.DataType.FLOAT else op.Cast(x, to=ir.DataType.FLOAT)
        if act_perm is not None:
            xf = op.Gather(xf, op.Cast(act_perm, to=ir.DataType.INT64), axis=-1)
        if fmt == "matmulnbits" and bits in (2, 4, 8):
            scales_f = op.Cast(c(s16.reshape(-1).numpy()), to=ir.DataType.FLOAT)
            b = block_bytes(packed, n, groups, g * bits // 8)
            zp = c(_pack_rows(z.astype(np.uint8), bits).reshape(-1))
            y = msft.MatMulNBits(xf, b, scales_f, zp, K=k, N=n, bits=bits, block_size=g,
                                 accuracy_level=accuracy_level)
        elif fmt == "qdq" and bits in (4, 8):
            codes_t = np.ascontiguousarray(unpack(P, bits, k).numpy().T)  # [K, N]
            dt = ir.DataType.UINT4 if bits == 4 else ir.DataType.UINT8
            data = (ir.PackedTensor(_pack_rows(codes_t.reshape(1, -1), 4).reshape(-1), dt,
                                    shape=[k, n]) if bits == 4 else ir.tensor(codes_t))
            zp_t = np.ascontiguousarray(z.T.astype(np.uint8))
            zp = (ir.PackedTensor(_pack_rows(zp_t.reshape(1, -1), 4).reshape(-1), dt,
                                  shape=[groups, n]) if bits == 4 else ir.tensor(zp_t))
            scale_t = op.Cast(c(np.ascontiguousarray(s16.numpy().T)),
                              to=ir.DataType.FLOAT)
            w_t = op.DequantizeLinear(c(data), scale_t, c(zp),
                                      axis=0, block_size=g)
            y = op.MatMul(xf, w_t)
        else:
            codes = unpack_in_graph(packed, bits, n, k)
            scale = op.Cast(scales, to=ir.DataType.FLOAT)
            w = op.DequantizeLinear(codes, scale, c(z.astype(np.uint8)),
                                    axis=1, block_size=g)
            y = op.MatMul(xf, op.Transpose(w, perm=[1, 0]))
        if bias is not None:
            y = op.Add(y, bias if bias.dtype == ir.DataType.FLOAT
                       else op.Cast(bias, to=ir.DataType.FLOAT))
        if outlier_ptr is not None:
            contrib, rows = outliers(xf, op.Cast(scales, to=ir.DataType.FLOAT), n, g, groups,
                                     outlier_ptr, outlier_idx, outlier_val)
            y = op.ScatterElements(y, op.Expand(rows, op.Shape(contrib)), contrib, axis=-1,
                                   reduction="add")
        return y if x.dtype == ir.DataType.FLOAT else op.CastLike(y, x)

    def babai_embedding(indices, packed, scales, zeros, bits: int, group_size: int,
                        embedding_dim: int, dtype=None):
        """Rows of the quantized table: ``GatherBlockQuantized`` (module doc), else a
        ``Gather`` of the packed rows, in-graph unpack and ``DequantizeLinear``."""
        P = real(packed)
        n, k, g = P.shape[0], embedding_dim, group_size
        groups = k // g
        z = unpack(real(zeros).reshape(1, -1), bits, n * groups).reshape(n, groups).numpy()
        s32 = real(scales).to(torch.float32).numpy()  # exact; T2 is the output type
        if fmt == "matmulnbits" and gather_block_quantized_fits(bits, g, k) \
                and P.shape[1] == k * bits // 8:
            # blocks along the last axis of MatMulNBits' [N, G, g·b/8] bytes: a tied lm_head
            # and the table are one initializer
            y = msft.GatherBlockQuantized(
                block_bytes(packed, n, groups, g * bits // 8), indices,
                c(s32.reshape(n, groups, 1)), c(z.astype(np.uint8).reshape(n, groups, 1)),
                bits=bits, block_size=g, gather_axis=0, quantize_axis=2)
            y = op.Reshape(y, op.Concat(op.Shape(indices), c([k], np.int64), axis=0))
        elif gather_block_quantized_fits(bits, g, k):
            data = c(np.ascontiguousarray(P.numpy()[:, :k * bits // 8]))
            zp = c(_pack_rows(z.astype(np.uint8), bits) if bits < 8 else z.astype(np.uint8))
            y = msft.GatherBlockQuantized(data, indices, c(s32), zp, bits=bits, block_size=g,
                                          gather_axis=0, quantize_axis=1)
        else:
            flat = op.Reshape(indices, c([-1], np.int64))
            codes = unpack_in_graph(op.Gather(packed, flat, axis=0), bits, -1, k)
            rows = op.DequantizeLinear(codes, op.Gather(c(s32), flat, axis=0),
                                       op.Gather(c(z.astype(np.uint8)), flat, axis=0),
                                       axis=1, block_size=g)
            y = op.Reshape(rows, op.Concat(op.Shape(indices), c([k], np.int64), axis=0))
        half = {torch.float16: ir.DataType.FLOAT16, torch.bfloat16: ir.DataType.BFLOAT16}
        return op.Cast(y, to=half[dtype]) if dtype in half else y

    return babai_linear, babai_embedding


def _slim(model) -> None:
    """Drop initializers no node reads (the re-laid-out packed originals) and per-node
    export metadata (stack traces, FX node text: larger than a small model's weights)."""
    import onnx_ir as ir

    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        node.metadata_props.clear()
    used = {v.name for node in ir.traversal.RecursiveGraphIterator(model.graph)
            for v in node.inputs if v is not None}
    used |= {v.name for v in model.graph.outputs}
    for name in [n for n in model.graph.initializers if n not in used]:
        del model.graph.initializers[name]


def export_onnx_program(ep: torch.export.ExportedProgram, path: str | Path,
                        fmt: str = "qdq", accuracy_level: int = 1,
                        input_names: Sequence[str] | None = None,
                        output_names: Sequence[str] | None = None) -> Path:
    """Translate an exported program with ``babai::linear`` calls to an ONNX file."""
    if fmt not in FORMATS:
        raise BabaiError(f"unknown ONNX format {fmt!r}: choose one of {FORMATS}")
    register_matmulnbits_schema()
    register_gather_block_quantized_schema()
    ep = with_plain_constants(ep)
    consts = {node.name: t for node in ep.graph.nodes
              if (t := constant_of(ep, node)) is not None}
    linear, embedding = _make_translation(consts, fmt, accuracy_level)
    table = {torch.ops.babai.linear.default: linear}
    if babai_embedding_nodes(ep):
        table[torch.ops.babai.embedding.default] = embedding
    prog = torch.onnx.export(ep, (), dynamo=True, custom_translation_table=table,
                             opset_version=OPSET, optimize=False, verbose=False,
                             input_names=input_names, output_names=output_names)
    _slim(prog.model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prog.save(str(path), external_data=False)
    return path


def ort_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session; fused 4-bit QDQ kept float32-accurate (accuracy level 1)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    if threads is not None:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(session, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    feed = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(np.asarray(o)) for o in session.run(None, feed)]


def to_onnx(model: torch.nn.Module, example_inputs: Sequence[torch.Tensor], path: str | Path,
            format: str = "qdq", verify: bool = True, accuracy_level: int = 1
            ) -> ExportReport:
    """Export ``model`` (with ``babai::linear`` layers) to ONNX; optionally run it once.

    ``format``: ``"qdq"`` (DequantizeLinear + MatMul) or ``"matmulnbits"`` (ORT contrib op);
    ``accuracy_level`` is MatMulNBits' compute precision (1 = float32, 4 = int8 activations).
    """
    example_inputs = tuple(example_inputs)
    with torch.no_grad(), plain_buffers(model):
        ep = torch.export.export(model, example_inputs, strict=False)
    n_q = len(babai_linear_nodes(ep))
    path = export_onnx_program(ep, path, format, accuracy_level)
    report = ExportReport(path=path, target="onnx", mode=format,
                          size_bytes=path.stat().st_size, quantized_linears=n_q)
    if verify:
        with torch.no_grad(), exact_forwards():  # the model's own numbers, as exported
            ref = flat_outputs(model(*example_inputs))
        got = run_onnx(ort_session(path), example_inputs)
        report.max_abs_diff, report.max_abs_ref = max_diff(got, ref)
    return report
