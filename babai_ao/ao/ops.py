"""The ``babai::`` custom ops: one op per quantized layer, seen whole by compile and export.

``babai::linear(x, packed, scales, zeros, bias, bits, group_size, in_features,
outlier_ptr, outlier_idx, outlier_val, act_perm)`` computes ``x[..., perm] @ Wᵀ + bias``
with ``W`` the packed weight (``babai_ao.formats.packed_weight``: b-bit codes, group scales
and zeros, SSQR's CSR outliers) and ``perm`` an optional gather of the activation columns
(``None``: identity). ``babai::dequantize`` returns ``W`` itself (the pattern
``babai_ao.passes`` rewrites away). ``babai::hptq_linear`` computes ``x @ (s·Q)ᵀ + bias``
from an HPTQ weight as stored — the canonical-Huffman stream of
``babai_ao.formats.huffman`` — with ``s`` one scale or one per row.
``babai::embedding(indices, packed, scales, zeros, bits, group_size, embedding_dim, dtype)``
returns rows ``indices`` of a quantized table, dequantizing those rows only (the exporters
lower it to ExecuTorch's ``quantized_decomposed::embedding_*bit`` and ONNX Runtime's
``GatherBlockQuantized``). The implementations here are the references; importing this
module registers the device kernels of ``babai_ao.kernels`` (Triton on CUDA, a vectorized
unpack on CPU).
"""

from __future__ import annotations

import torch

from babai_ao.errors import BabaiError
from babai_ao.formats import huffman
from babai_ao.formats.packed_weight import (
    check_packed,
    dequantize_packed,
    embedding_rows,
)


@torch.library.custom_op("babai::linear", mutates_args=())
def linear(
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
    w = dequantize_packed(packed, scales, zeros, bits, group_size, in_features,
                          outlier_ptr, outlier_idx, outlier_val, dtype=torch.float32)
    xf = x.to(torch.float32)
    if act_perm is not None:
        xf = xf.index_select(-1, act_perm)
    out = torch.nn.functional.linear(xf, w, None if bias is None else bias.to(torch.float32))
    return out.to(x.dtype)


@linear.register_fake
def _(x, packed, scales, zeros, bias, bits, group_size, in_features,
      outlier_ptr=None, outlier_idx=None, outlier_val=None, act_perm=None):
    check_packed(packed, scales, zeros, bits, group_size, in_features)
    if x.shape[-1] != in_features:
        raise BabaiError(f"x has {x.shape[-1]} features, the layer expects {in_features}")
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


@torch.library.custom_op("babai::dequantize", mutates_args=())
def dequantize(
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
    """``W`` [N, K] in ``dtype``; a float weight, so compiled models should not keep it."""
    return dequantize_packed(packed, scales, zeros, bits, group_size, in_features,
                             outlier_ptr, outlier_idx, outlier_val, dtype)


@dequantize.register_fake
def _(packed, scales, zeros, bits, group_size, in_features, outlier_ptr=None,
      outlier_idx=None, outlier_val=None, dtype=torch.float32):
    check_packed(packed, scales, zeros, bits, group_size, in_features)
    return packed.new_empty((packed.shape[0], in_features), dtype=dtype)


def check_hptq(x: torch.Tensor, scale: torch.Tensor, out_features: int, in_features: int,
               max_len: int) -> None:
    """Shape checks of ``babai::hptq_linear`` (compile-safe)."""
    if x.shape[-1] != in_features:
        raise BabaiError(f"x has {x.shape[-1]} features, the layer expects {in_features}")
    if scale.numel() not in (1, out_features):
        raise BabaiError(f"HPTQ scale must hold 1 or {out_features} values, got "
                         f"{scale.numel()}: the checkpoint is corrupt")
    if not 0 <= max_len <= huffman.MAX_LEN_LIMIT:
        raise BabaiError(f"Huffman code length limit {max_len} is outside 0.."
                         f"{huffman.MAX_LEN_LIMIT}: the stream header is corrupt")


@torch.library.custom_op("babai::hptq_linear", mutates_args=())
def hptq_linear(
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
    """Reference: decode the stream (``huffman.decode``), then one float32 linear."""
    check_hptq(x, scale, out_features, in_features, max_len)
    header = torch.tensor([out_features * in_features, chunk, max_len], dtype=torch.int64)
    stream = huffman.HuffmanStream(bitstream.cpu(), symbols.cpu(), lengths.cpu(),
                                   offsets.cpu(), header)
    q = huffman.decode(stream).reshape(out_features, in_features).to(x.device, torch.float32)
    w = scale.to(torch.float32).reshape(-1, 1) * q
    b = None if bias is None else bias.to(torch.float32)
    return torch.nn.functional.linear(x.to(torch.float32), w, b).to(x.dtype)


@hptq_linear.register_fake
def _(x, bitstream, symbols, lengths, offsets, scale, bias, out_features, in_features, chunk,
      max_len):
    check_hptq(x, scale, out_features, in_features, max_len)
    return x.new_empty((*x.shape[:-1], out_features))


def _check_indices(indices: torch.Tensor) -> None:
    if indices.dtype not in (torch.int64, torch.int32):
        raise BabaiError(f"embedding indices must be int64 or int32, got {indices.dtype}")


@torch.library.custom_op("babai::embedding", mutates_args=())
def embedding(
    indices: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    embedding_dim: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Rows ``indices`` of the quantized table, ``[*indices.shape, embedding_dim]``."""
    _check_indices(indices)
    return embedding_rows(indices, packed, scales, zeros, bits, group_size, embedding_dim,
                          dtype)


@embedding.register_fake
def _(indices, packed, scales, zeros, bits, group_size, embedding_dim, dtype=torch.float32):
    check_packed(packed, scales, zeros, bits, group_size, embedding_dim)
    _check_indices(indices)
    return packed.new_empty((*indices.shape, embedding_dim), dtype=dtype)


def babai_embedding(indices: torch.Tensor, weight) -> torch.Tensor:
    """``weight[indices]`` for a ``BabaiQuantizedTensor`` table, through ``babai::embedding``."""
    if weight.transposed:
        raise BabaiError("an embedding table cannot be a transposed BabaiQuantizedTensor: "
                         "pass the weight itself, [num_embeddings, embedding_dim]")
    if weight.outlier_ptr is not None:
        raise BabaiError("quantized embeddings with SSQR outliers are not supported: quantize "
                         "the embedding with babai_ao.quantize_embeddings_ (RTN, clipped)")
    return torch.ops.babai.embedding(indices, weight.qdata, weight.scale, weight.zero_point,
                                     weight.bits, weight.group_size, weight.in_features,
                                     weight.dtype)


ACTIVATIONS = {"silu": torch.nn.functional.silu, "relu": torch.nn.functional.relu,
               "gelu": torch.nn.functional.gelu,
               "gelu_pytorch_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh")}


@torch.library.custom_op("babai::experts", mutates_args=())
def experts(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_packed: torch.Tensor,
    gate_up_scales: torch.Tensor,
    gate_up_zeros: torch.Tensor,
    down_packed: torch.Tensor,
    down_scales: torch.Tensor,
    down_zeros: torch.Tensor,
    bits: int,
    group_size: int,
    act: str,
) -> torch.Tensor:
    """Routed MoE experts, each expert ``e`` two packed linears:

        y[t] = Σ_{k: index[t,k] = e} weight[t,k] · W_down[e] · (act(g) ⊙ u),  [g; u] = W_gu[e] x[t]

    with ``W_gu[e]`` [2I, H] and ``W_down[e]`` [H, I] packed weights (one slice of the
    stacked ``*_packed``/``*_scales``/``*_zeros`` per expert, ``babai_ao.formats.packed_weight``).
    Only the tokens routed to an expert reach its two ``babai::linear`` calls; index values
    outside ``[0, E)`` (padding) are skipped.
    """
    if act not in ACTIVATIONS:
        raise BabaiError(f"activation {act!r} is not supported by babai::experts: one of "
                         f"{sorted(ACTIVATIONS)}")
    num, hidden = gate_up_packed.shape[0], x.shape[-1]
    inter = gate_up_packed.shape[1] // 2  # W_gu stacks gate and up: [2I, H]
    flat = x.reshape(-1, hidden)
    out = torch.zeros_like(flat)
    index = top_k_index.reshape(flat.shape[0], -1)
    weights = top_k_weights.reshape(flat.shape[0], -1)
    for e in torch.unique(index).tolist():
        if not 0 <= e < num:
            continue
        tokens, slot = torch.where(index == e)
        gate, up = torch.ops.babai.linear(flat[tokens], gate_up_packed[e], gate_up_scales[e],
                                          gate_up_zeros[e], None, bits, group_size,
                                          hidden).chunk(2, dim=-1)
        y = torch.ops.babai.linear(ACTIVATIONS[act](gate) * up, down_packed[e], down_scales[e],
                                   down_zeros[e], None, bits, group_size, inter)
        out.index_add_(0, tokens, (y * weights[tokens, slot, None]).to(out.dtype))
    return out.reshape(x.shape)


@experts.register_fake
def _(x, top_k_index, top_k_weights, gate_up_packed, gate_up_scales, gate_up_zeros,
      down_packed, down_scales, down_zeros, bits, group_size, act):
    if gate_up_packed.dim() != 3 or down_packed.dim() != 3 \
            or gate_up_packed.shape[0] != down_packed.shape[0]:
        raise BabaiError("babai::experts takes [E, N, K/8·b] packed stacks of one size E")
    return torch.empty_like(x)


from babai_ao.kernels import register as _register  # noqa: E402,F401  (device kernels)
