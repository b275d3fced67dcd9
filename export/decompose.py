"""Rewrites of ``babai::linear`` into ops an ahead-of-time runtime executes.

Both are decompositions for ``ExportedProgram.run_decompositions({babai::linear: fn})`` (that
single entry: the full default table would constant-fold the weight back to float).

``exact_linear`` rebuilds ``W[n, k] = s[n, k//g] · (q[n, k] − z[n, k//g]) + s[n, k//g] · δ[n, k]``
from the packed bytes with plain ATen integer ops on every call (any bit-width, 3-bit too) and
computes ``x @ Wᵀ + b`` in float32: the same float operations as the eager reference, so the
weight is bit-identical and outputs differ only by the matmul's summation order.

``linear_8da4w`` (4-bit) emits torchao's int8-dynamic-activation / int4-weight pattern that
ExecuTorch's XNNPACK partitioner fuses: per-token asymmetric int8 ``x̂`` and the symmetric
codes ``q − 8`` held in int8 with per-group scales ``s``. An asymmetric grid differs from that
by ``s·(z − 8)`` per group, so when ``asymmetric`` the exact correction
``− Σ_g (Σ_{k∈g} x_k) · s[n, g]·(z[n, g] − 8)`` is added (a float matmul 1/g the size).
SSQR outliers are added on the output: ``y[n] += Σ_j x[idx_j] · s[n, idx_j//g] · δ_j``.

``exact_embedding`` is ``babai::embedding`` (``babai_ao.ao.ops``) in the same spirit: the
looked-up packed rows are gathered and dequantized with ATen integer ops (any bit-width).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import babai_ao.ao.ops  # noqa: F401  (defines babai::linear, babai::embedding)

_OP = torch.ops.babai.linear.default


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Codes [rows, n] int32 from ``babai_ao.formats.packing`` bytes [rows, nb], with ATen ops only.

    Code ``k`` sits at bit ``k·b`` of the row: for b ∈ {2, 4, 8} inside one byte
    (``(p >> (i·b)) & (2^b − 1)``); for b = 3 eight codes share a 24-bit word
    ``p₀ | p₁ << 8 | p₂ << 16``, read as ``(word >> 3i) & 7``.
    """
    rows, nb = packed.shape
    p = packed.to(torch.int32)
    if bits == 8:
        return p[:, :n]
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=packed.device)
        codes = torch.bitwise_and(torch.bitwise_right_shift(p.unsqueeze(-1), shifts), mask)
    else:
        p = p.reshape(rows, nb // bits, bits)
        byte_shifts = torch.arange(0, 8 * bits, 8, dtype=torch.int32, device=packed.device)
        word = torch.bitwise_left_shift(p, byte_shifts).sum(-1, keepdim=True, dtype=torch.int32)
        shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int32, device=packed.device)
        codes = torch.bitwise_and(torch.bitwise_right_shift(word, shifts), mask)
    return codes.reshape(rows, -1)[:, :n]


def outlier_rows(outlier_ptr: torch.Tensor, nnz: int) -> torch.Tensor:
    """Row of each CSR entry, with static shapes: ``cumsum`` of row-start markers.

    Row ``n``'s entries start at ``ptr[n]``; counting the starts ``ptr[1..N−1] ≤ j`` gives the
    row of entry ``j`` (empty rows add several markers at one place, which is what we want).
    """
    n_rows = outlier_ptr.shape[0] - 1
    starts = outlier_ptr[1:n_rows].to(torch.int64)
    marks = torch.zeros(nnz + 1, dtype=torch.int64, device=outlier_ptr.device)
    marks = marks.index_add(0, starts, torch.ones_like(starts))
    return torch.cumsum(marks, 0)[:nnz]


def _outlier_scale(scales: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                   val: torch.Tensor, group_size: int) -> torch.Tensor:
    """``s[row, col//g] · δ`` per CSR entry, float32."""
    groups = scales.shape[1]
    s = scales.to(torch.float32).reshape(-1).index_select(0, rows * groups + cols // group_size)
    return s * val.to(torch.float32)


def dequantize_aten(packed, scales, zeros, bits, group_size, in_features,
                    outlier_ptr=None, outlier_idx=None, outlier_val=None) -> torch.Tensor:
    """Float32 weight [N, K], the same float operations as ``babai_ao.formats.packed_weight.dequantize_packed``."""
    n = packed.shape[0]
    groups = in_features // group_size
    q = unpack_codes(packed, bits, in_features).to(torch.float32)
    z = unpack_codes(zeros.reshape(1, -1), bits, n * groups).reshape(n, groups)
    s = scales.to(torch.float32)
    w = (q.reshape(n, groups, group_size) - z.to(torch.float32).unsqueeze(-1)) * s.unsqueeze(-1)
    w = w.reshape(n, in_features)
    if outlier_ptr is not None:
        nnz = outlier_idx.shape[0]
        rows = outlier_rows(outlier_ptr, nnz)
        cols = outlier_idx.to(torch.int64)
        delta = _outlier_scale(scales, rows, cols, outlier_val, group_size)
        w = w.reshape(-1).index_add(0, rows * in_features + cols, delta).reshape(n, in_features)
    return w


def _input(x: torch.Tensor, act_perm: torch.Tensor | None) -> torch.Tensor:
    """``x`` in float32 with its columns gathered by ``act_perm`` (when given)."""
    xf = x.to(torch.float32)
    return xf if act_perm is None else xf.index_select(-1, act_perm)


def exact_linear(x, packed, scales, zeros, bias, bits, group_size, in_features,
                 outlier_ptr=None, outlier_idx=None, outlier_val=None, act_perm=None
                 ) -> torch.Tensor:
    """``babai::linear`` as portable ATen ops: dequantize then a float32 ``linear``."""
    w = dequantize_aten(packed, scales, zeros, bits, group_size, in_features,
                        outlier_ptr, outlier_idx, outlier_val)
    b = None if bias is None else bias.to(torch.float32)
    return torch.nn.functional.linear(_input(x, act_perm), w, b).to(x.dtype)


def exact_dequantize(packed, scales, zeros, bits, group_size, in_features, outlier_ptr=None,
                     outlier_idx=None, outlier_val=None, dtype=torch.float32) -> torch.Tensor:
    """``babai::dequantize`` (a float weight for non-linear uses) rebuilt at run time."""
    return dequantize_aten(packed, scales, zeros, bits, group_size, in_features,
                           outlier_ptr, outlier_idx, outlier_val).to(dtype)


def exact_embedding(indices, packed, scales, zeros, bits, group_size, embedding_dim,
                    dtype=torch.float32) -> torch.Tensor:
    """``babai::embedding`` as portable ATen ops: gather the packed rows, their scales and
    zero codes, dequantize those rows only (the same float operations as eager)."""
    from babai_ao.formats.packed_weight import zero_codes

    groups = embedding_dim // group_size
    flat = indices.reshape(-1).to(torch.int64)
    q = unpack_codes(packed.index_select(0, flat), bits, embedding_dim).to(torch.float32)
    z = zero_codes(zeros, bits, flat, groups).to(torch.float32)
    s = scales.index_select(0, flat).to(torch.float32)
    e = (q.reshape(-1, groups, group_size) - z.unsqueeze(-1)) * s.unsqueeze(-1)
    return e.reshape(*indices.shape, embedding_dim).to(dtype)


def make_linear_8da4w(asymmetric: bool) -> Callable[..., torch.Tensor]:
    """The 8da4w decomposition; ``asymmetric`` adds the zero-point correction (module doc)."""

    def linear_8da4w(x, packed, scales, zeros, bias, bits, group_size, in_features,
                     outlier_ptr=None, outlier_idx=None, outlier_val=None, act_perm=None
                     ) -> torch.Tensor:
        n = packed.shape[0]
        groups = in_features // group_size
        xf = _input(x, act_perm)
        block = [1] * (xf.dim() - 1) + [in_features]
        ao = torch.ops.torchao
        xs, xz = ao.choose_qparams_affine(xf, "ASYMMETRIC", block, torch.int8, -128, 127,
                                          None, None, torch.int8)
        xq = ao.quantize_affine(xf, block, xs, xz, torch.int8, -128, 127)
        xd = ao.dequantize_affine(xq, block, xs, xz, torch.int8, -128, 127)
        q = (unpack_codes(packed, bits, in_features) - 8).to(torch.int8)
        s = scales.to(torch.float32)
        wd = ao.dequantize_affine(q, [1, group_size], s, torch.zeros_like(q[:, :groups]),
                                  torch.int8, -8, 7)
        b = None if bias is None else bias.to(torch.float32)
        y = torch.nn.functional.linear(xd, wd, b)
        if asymmetric:
            z = unpack_codes(zeros.reshape(1, -1), bits, n * groups).reshape(n, groups)
            corr = s * (z - 8).to(torch.float32)
            xg = xf.reshape(*xf.shape[:-1], groups, group_size).sum(-1)
            y = y - torch.nn.functional.linear(xg, corr)
        if outlier_ptr is not None:
            y = y + _output_outliers(xf, scales, group_size, n, outlier_ptr, outlier_idx,
                                     outlier_val)
        return y.to(x.dtype)

    return linear_8da4w


def _output_outliers(xf, scales, group_size, n, ptr, idx, val) -> torch.Tensor:
    """``y[..., n] = Σ_{j in row n} x[..., idx_j] · s[n, idx_j//g] · δ_j`` by gather/scatter."""
    rows = outlier_rows(ptr, idx.shape[0])
    cols = idx.to(torch.int64)
    contrib = xf.index_select(-1, cols) * _outlier_scale(scales, rows, cols, val, group_size)
    out = torch.zeros(*xf.shape[:-1], n, dtype=torch.float32, device=xf.device)
    return out.index_add(-1, rows, contrib)


def babai_linear_nodes(ep: torch.export.ExportedProgram) -> list[torch.fx.Node]:
    """The ``babai::linear`` calls of an exported program."""
    return [n for n in ep.graph.nodes if n.op == "call_function" and n.target == _OP]


def babai_embedding_nodes(ep: torch.export.ExportedProgram) -> list[torch.fx.Node]:
    """The ``babai::embedding`` calls of an exported program."""
    op = torch.ops.babai.embedding.default
    return [n for n in ep.graph.nodes if n.op == "call_function" and n.target == op]


def dequantize_op() -> torch._ops.OpOverload | None:
    """``babai::dequantize`` when this build of ``babai_ao.ao.ops`` defines it."""
    packet = getattr(torch.ops.babai, "dequantize", None) if hasattr(torch.ops, "babai") else None
    return None if packet is None else packet.default


def constant_of(ep: torch.export.ExportedProgram, node: torch.fx.Node) -> torch.Tensor | None:
    """The real tensor a placeholder of ``ep`` is bound to (parameter, buffer or constant)."""
    if not isinstance(node, torch.fx.Node) or node.op != "placeholder":
        return None
    sig = ep.graph_signature
    for mapping in (sig.inputs_to_parameters, sig.inputs_to_buffers,
                    sig.inputs_to_lifted_tensor_constants):
        if node.name in mapping:
            key = mapping[node.name]  # non-persistent buffers live in ep.constants
            return ep.state_dict[key] if key in ep.state_dict else ep.constants[key]
    return None


def with_plain_constants(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``ep`` with tensor-subclass weights flattened, so ``babai::linear`` reads placeholders.

    A ``BabaiQuantizedTensor`` parameter reaches the op through subclass accessors; an empty
    decomposition table unwraps it into plain constants and decomposes nothing else.
    """
    if all(isinstance(a, torch.fx.Node) and a.op == "placeholder"
           for n in babai_linear_nodes(ep) for a in n.args[1:4]):
        return ep
    return ep.run_decompositions({})
