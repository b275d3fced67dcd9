"""compressed-tensors "pack-quantized" checkpoints: babai-ao codes for vLLM and transformers.

The layout llm-compressor writes for weight-only integer quantization, which vLLM serves
(Marlin / machete / CPU kernels) and transformers loads through its compressed-tensors
integration. Per quantized linear ``<m>`` of weight ``W`` [N, K] with G groups:

* ``<m>.weight_packed``: int32 [N, ceil(K·b/32)]: the row's b-bit fields packed densely
  along the input dimension, field ``k`` at bit ``k·b`` of the row's little-endian word
  string (for b = 4, 8 that is ``32/b`` fields per word, field ``k`` in word ``k·b // 32``
  at shift ``k·b % 32``);
* ``<m>.weight_scale``: [N, G] scales; ``<m>.weight_shape``: int64 ``[N, K]``;
* ``<m>.weight_zero_point`` (asymmetric only): int32 [ceil(N·b/32), G], the zero-point
  fields packed the same way but along the *output* dimension (``packed_dim=0``);
* no ``weight_g_idx``: babai-ao's groups are static (codes stay in column order whatever
  the quantization order), which is compressed-tensors' ``actorder: null``.

compressed-tensors' integers are signed, ``v ∈ [−2^(b−1), 2^(b−1) − 1]``, with
``W = s·(v − zp)`` (``zp`` absent, i.e. 0, when symmetric), and a field holds ``v + 2^(b−1)``.
babai-ao's are unsigned, ``W = s·(q − z)`` with ``q, z ∈ [0, 2^b − 1]``. The map is

    v = q − 2^(b−1),    zp = z − 2^(b−1)    ⇒    v − zp = q − z,

and symmetric babai-ao grids have ``z = 2^(b−1)``, so ``zp = 0``, exactly the symmetric
layout. Either way the stored field ``v + 2^(b−1)`` *is* the babai-ao code ``q`` (and the
zero-point field *is* ``z``): the files hold our codes bit for bit, nothing is re-rounded.
Scales are the float16 values the quantizer used, written in the model's dtype when that
holds them exactly (float32, float16), else as float16. A loader dequantizing in float32
reproduces ``dequantize()`` exactly (``(q − z)·s`` needs ≤ 9 + 11 significant bits); one
dequantizing in float16 rounds that product once to float16, and a bfloat16 model rounds
the scales themselves to bfloat16 (as for every checkpoint served in bfloat16).

Representable: 4- and 8-bit layers (what vLLM's compressed-tensors weight-only kernels
take), grouped or one group per row (``strategy: channel``), symmetric or asymmetric.
Not representable, each a ``BabaiError``: 2- and 3-bit layers, SSQR's sparse outliers,
HPTQ's entropy-coded weights, quantized embeddings.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from babai_ao.errors import BabaiError

FORMAT = "pack-quantized"
SUPPORTED_BITS = (4, 8)
WORKS = ("4- or 8-bit babai-ao layers (RTN or Babai/GPTQ, clip true, symmetric or not, "
         "any group size)")


# ---- the mapping (pure functions) ----------------------------------------------------------
def pack_int32(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit fields [R, C] densely along dim 1 into int32 [R, ⌈C·b/32⌉].

    Field ``c`` lands at bit ``c·b`` of the row's little-endian word string; ``bits`` must
    divide 32, so no field straddles two words. Words are returned as two's-complement
    int32 (a word whose top bit is set is negative), the bit pattern unchanged.
    """
    if 32 % bits or bits > 8:
        raise BabaiError(f"int32 packing here takes 1, 2, 4 or 8 bits, got {bits}")
    if fields.numel() and (int(fields.min()) < 0 or int(fields.max()) >= 2**bits):
        raise BabaiError(f"fields outside [0, {2**bits - 1}] cannot be packed at {bits} bits")
    per_word = 32 // bits
    rows, cols = fields.shape
    words = -(-cols // per_word)
    f = nn.functional.pad(fields.to(torch.int64), (0, words * per_word - cols))
    shifts = torch.arange(per_word, dtype=torch.int64, device=f.device) * bits
    word = (f.reshape(rows, words, per_word) << shifts).sum(-1)  # in [0, 2^32)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def to_signed(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """babai-ao's unsigned codes (or zero codes) as compressed-tensors' signed integers:
    ``v = q − 2^(b−1)`` (int8)."""
    return (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)


@dataclass(frozen=True)
class Scheme:
    """One compressed-tensors weight scheme: b bits, grouped (``group_size``) or one group per
    row (``group_size=None``: strategy ``channel``), symmetric or not."""

    bits: int
    group_size: int | None
    symmetric: bool

    def weights(self) -> dict[str, Any]:
        """The ``weights`` entry of a config group (compressed-tensors ``QuantizationArgs``)."""
        return {"num_bits": self.bits, "type": "int", "symmetric": self.symmetric,
                "strategy": "channel" if self.group_size is None else "group",
                "group_size": self.group_size, "dynamic": False, "actorder": None,
                "block_structure": None, "observer": "minmax", "observer_kwargs": {}}

    def config_group(self, targets: list[str]) -> dict[str, Any]:
        """A ``config_groups`` entry (compressed-tensors ``QuantizationScheme``)."""
        return {"targets": targets, "weights": self.weights(), "input_activations": None,
                "output_activations": None, "format": FORMAT}


def check_representable(name: str, weight: Any) -> None:
    """Raise ``BabaiError`` (one line, naming what works) if ``weight`` of layer ``name``
    cannot be written as compressed-tensors pack-quantized."""
    from babai_ao.ao.hptq_tensor import HuffmanQuantizedTensor

    if isinstance(weight, HuffmanQuantizedTensor):
        raise BabaiError(f"{name} is HPTQ (entropy-coded, unclipped codes), which "
                         f"compressed-tensors cannot hold: export {WORKS}")
    if weight.outlier_ptr is not None:
        raise BabaiError(f"{name} carries sparse outlier codes beyond the {weight.bits}-bit "
                         "range (SSQR, or HPTQ decoded), which compressed-tensors cannot hold: "
                         f"export {WORKS}")
    if weight.bits not in SUPPORTED_BITS:
        raise BabaiError(f"{name} is {weight.bits}-bit; compressed-tensors pack-quantized as "
                         f"vLLM serves it takes 4 or 8 bits: export {WORKS} (or use "
                         "--format pte/onnx, which take 2 and 3 bits)")
    if weight.transposed:
        raise BabaiError(f"{name} holds a transposed view of a quantized weight: export the "
                         "model's own linears")


def is_symmetric(weight: Any) -> bool:
    """Whether every zero code of ``weight`` is ``2^(b−1)`` (a symmetric grid: ``zp = 0``)."""
    return bool((weight.zero_points() == 2 ** (weight.bits - 1)).all())


def layer_scheme(weight: Any, symmetric: bool) -> Scheme:
    """The scheme of one quantized weight: channel strategy when it has one group per row."""
    groups = weight.scale.shape[1]
    return Scheme(weight.bits, None if groups == 1 else weight.group_size, symmetric)


def scale_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The dtype scales are written in: the model's when it holds babai-ao's float16 scales
    exactly (float16, float32), else float16 (a bfloat16 model's loader rounds them itself)."""
    return model_dtype if model_dtype in (torch.float16, torch.float32) else torch.float16


def layer_tensors(weight: Any, symmetric: bool) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one ``BabaiQuantizedTensor`` (suffixes of ``weight``).

    ``weight_packed`` holds the codes ``q`` as fields ``v + 2^(b−1) = q``; with
    ``symmetric`` (every ``z = 2^(b−1)``, checked) no zero point is written, else
    ``weight_zero_point`` holds the zero codes ``z`` as fields ``zp + 2^(b−1) = z``.
    """
    bits = weight.bits
    codes = weight.codes()  # [N, K] int64 in [0, 2^b); no outliers (checked)
    zeros = weight.zero_points()  # [N, G]
    out = {"weight_packed": pack_int32(codes, bits),
           "weight_scale": weight.scale.detach().to(scale_dtype(weight.dtype)).contiguous(),
           "weight_shape": torch.tensor([weight.out_features, weight.in_features],
                                        dtype=torch.int64)}
    if symmetric:
        if not bool((zeros == 2 ** (bits - 1)).all()):
            raise BabaiError("an asymmetric layer cannot be written as symmetric: leave "
                             "symmetric=None")
    else:
        out["weight_zero_point"] = pack_int32(zeros.t(), bits).t().contiguous()
    return out


def quantization_config(groups: dict[Scheme, list[str]], ignore: list[str],
                        version: str) -> dict[str, Any]:
    """``config.json``'s ``quantization_config`` for layers ``groups`` (scheme → names).

    One scheme targets every ``Linear`` (minus ``ignore``, the float linears) as
    llm-compressor writes it; several schemes each target their layers by name.
    """
    one = len(groups) == 1
    config_groups = {f"group_{i}": scheme.config_group(["Linear"] if one else sorted(names))
                     for i, (scheme, names) in enumerate(groups.items())}
    return {"quant_method": "compressed-tensors", "format": FORMAT,
            "quantization_status": "compressed", "config_groups": config_groups,
            "ignore": sorted(ignore), "kv_cache_scheme": None,
            "global_compression_ratio": None, "sparsity_config": {},
            "transform_config": {}, "version": version}


# ---- the model and the files (thin adapter) --------------------------------------------------
def _quantized_linears(model: nn.Module) -> tuple[dict[str, Any], list[str]]:
    """Quantized weights by module name (each checked), and the names of float linears."""
    from babai_ao.ao.hptq_tensor import HuffmanQuantizedTensor
    from babai_ao.ao.tensor import BabaiQuantizedTensor

    quantized: dict[str, Any] = {}
    floats: list[str] = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, (BabaiQuantizedTensor, HuffmanQuantizedTensor)):
            if isinstance(module, nn.Linear):
                floats.append(name)
            continue
        if not isinstance(module, nn.Linear):
            raise BabaiError(f"{name} is a quantized {type(module).__name__}; compressed-tensors "
                             "(as vLLM loads it) quantizes linears only: keep the embedding "
                             f"float and export {WORKS}")
        check_representable(name, weight)
        quantized[name] = weight
    if not quantized:
        raise BabaiError("the model holds no babai-ao quantized linears: quantize it first "
                         f"({WORKS})")
    return quantized, floats


def compressed_state_dict(model: nn.Module, symmetric: bool | None = None
                          ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors to write and the ``quantization_config``; raises before anything is written.

    ``symmetric``: ``None`` writes symmetric (no zero points) when every layer's grid is
    symmetric, else asymmetric for all; ``True`` insists on symmetric.
    """
    import compressed_tensors

    quantized, floats = _quantized_linears(model)
    if symmetric is None:
        symmetric = all(is_symmetric(w) for w in quantized.values())
    groups: dict[Scheme, list[str]] = {}
    for name, weight in quantized.items():
        groups.setdefault(layer_scheme(weight, symmetric), []).append(name)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, torch.dtype, tuple[int, ...]]] = set()
    for key, value in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if module in quantized and leaf == "weight":
            for suffix, t in layer_tensors(quantized[module], symmetric).items():
                tensors[f"{module}.{suffix}"] = t
            continue
        ident = (value.untyped_storage().data_ptr(), value.dtype, tuple(value.shape))
        if ident in seen:  # a tied weight (lm_head = embed_tokens): stored once
            continue
        seen.add(ident)
        tensors[key] = value.detach().contiguous()
    config = quantization_config(groups, floats, compressed_tensors.__version__)
    return tensors, config


def save_compressed_tensors(model: nn.Module, path: str | os.PathLike, tokenizer: Any = None,
                            symmetric: bool | None = None) -> Path:
    """Write ``model`` (a transformers model holding babai-ao linears) to directory ``path`` as
    compressed-tensors pack-quantized: ``model.safetensors``, ``config.json`` with the
    ``quantization_config``, ``generation_config.json`` and the tokenizer if given.

    Every check runs before anything is written (``BabaiError``: not a transformers model,
    no quantized linears, a layer the format cannot hold). Returns ``path``.
    """
    from safetensors.torch import save_file

    if not hasattr(model, "config") or not hasattr(model.config, "to_json_string"):
        raise BabaiError(f"{type(model).__name__} is not a transformers model (no config): "
                         "compressed-tensors checkpoints need one for config.json")
    tensors, qconfig = compressed_state_dict(model, symmetric)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = copy.copy(model.config)  # shallow: the model's own config keeps its settings
    config.quantization_config = qconfig
    (out / "config.json").write_text(config.to_json_string(use_diff=False))
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def read_quantization_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``quantization_config`` of a saved directory's ``config.json``."""
    return json.loads((Path(path) / "config.json").read_text())["quantization_config"]
