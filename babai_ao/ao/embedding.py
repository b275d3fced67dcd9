"""Quantized token embeddings (and the tied ``lm_head``): the config and the quantizer.

The embedding table ``E`` [V, D] is stored like any babai weight — a ``BabaiQuantizedTensor``
[N = V, K = D], b-bit codes packed per row, groups of ``g`` along the embedding dimension,
fp16 scales and packed zeros (``babai_ao.ao.tensor``) — rounded to nearest on the babai grid
(``H = I``: there is no Hessian for a lookup table). A lookup never dequantizes the table:
``aten.embedding`` on the tensor calls the one custom op ``babai::embedding``
(``babai_ao.ao.ops``), which gathers the packed rows, their scales and their zero codes, and returns
``E[i, k] = s[i, k//g] · (q[i, k] − z[i, k//g])`` for the requested rows only (float32
arithmetic, the same operations as ``BabaiQuantizedTensor.dequantize``, so the rows are
bit-identical to the dequantized table's). ``torch.export`` sees that one op; the exporters
lower it to ExecuTorch's ``quantized_decomposed::embedding_{2,4}bit`` / ``embedding_byte``
kernels and to ONNX Runtime's ``com.microsoft.GatherBlockQuantized``.

When ``lm_head`` shares the embedding's Parameter (tied weights, as in SmolLM2), the one
quantized Parameter is installed in both modules: the lookup goes through
``babai::embedding``, the output projection through ``babai::linear``, and the tie is kept.

    quantize_embeddings_(model, bits=4, group_size=64)            # RTN, asymmetric

or, torchao style, ``quantize_(model, babai_embedding_config(...), filter_fn=is_embedding)``
(one module at a time: a tied ``lm_head`` keeps its float weight; prefer the function).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler

from babai_ao.errors import BabaiError
from babai_ao.lattice.grid import SUPPORTED_BITS

from .tensor import BabaiQuantizedTensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---- the config and the in-place quantizer -----------------------------------------------
@dataclass
class BabaiEmbeddingConfig(AOBaseConfig):
    """Round-to-nearest b-bit embedding tables, groups of ``group_size`` along the embedding
    dimension, asymmetric (or ``symmetric``) min-max grid, fp16 scales."""

    bits: int = 4
    group_size: int = 64
    symmetric: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS:
            raise BabaiError(f"embedding bits={self.bits!r} is not supported: choose one of "
                             f"{SUPPORTED_BITS} (4 or 8 are the usual choices)")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) \
                or self.group_size <= 0:
            raise BabaiError(f"embedding group_size={self.group_size!r} must be a positive "
                             "integer dividing the embedding dimension (e.g. 32, 64, 128)")
        if not isinstance(self.symmetric, bool):
            raise BabaiError(f"symmetric={self.symmetric!r} must be True or False")

    def quantize_table(self, weight: torch.Tensor):
        """The table [V, D] as a ``BabaiQuantizedTensor`` (dtype kept)."""
        if isinstance(weight, BabaiQuantizedTensor):
            raise BabaiError("this embedding is already quantized: quantize the float model "
                             "(load it again) instead of quantizing twice")
        if weight.dim() != 2 or weight.dtype not in FLOAT_DTYPES:
            raise BabaiError(f"an embedding table is a 2-D float tensor, got "
                             f"{weight.dtype} {tuple(weight.shape)}")
        dim = weight.shape[1]
        if dim % self.group_size:
            raise BabaiError(f"group_size={self.group_size} does not divide the embedding "
                             f"dimension {dim}: choose a divisor of {dim} (e.g. "
                             f"{_divisor_hint(dim)})")
        return BabaiQuantizedTensor.from_hp(weight.detach(), bits=self.bits,
                                            group_size=self.group_size,
                                            symmetric=self.symmetric)


def _divisor_hint(dim: int) -> str:
    good = [g for g in (32, 64, 128, 16, 8) if dim % g == 0]
    return str(good[0]) if good else str(dim)


def babai_embedding_config(bits: int = 4, group_size: int = 64, symmetric: bool = False
                           ) -> BabaiEmbeddingConfig:
    """The config for ``quantize_(model, ..., filter_fn=is_embedding)`` (validated)."""
    return BabaiEmbeddingConfig(bits=bits, group_size=group_size, symmetric=symmetric)


def is_embedding(module: nn.Module, fqn: str = "") -> bool:
    """``filter_fn`` for ``quantize_`` that selects ``nn.Embedding`` modules."""
    return isinstance(module, nn.Embedding)


@register_quantize_module_handler(BabaiEmbeddingConfig)
def _embedding_transform(module: nn.Module, config: BabaiEmbeddingConfig, *,
                         parameter_name: str = "weight") -> nn.Module:
    if not isinstance(module, nn.Embedding) or parameter_name != "weight":
        raise BabaiError(f"babai_embedding_config quantizes nn.Embedding weights, got "
                         f"{type(module).__name__}.{parameter_name}: pass "
                         "filter_fn=babai_ao.ao.embedding.is_embedding")
    _check_embedding_module(module)
    module.weight = nn.Parameter(config.quantize_table(module.weight), requires_grad=False)
    return module


def _check_embedding_module(module: nn.Embedding) -> None:
    if module.max_norm is not None:
        raise BabaiError("an embedding with max_norm renormalizes its table in place: a "
                         "quantized table cannot be; set max_norm=None first")


def quantize_embeddings_(model: nn.Module, bits: int = 4, group_size: int = 64,
                         symmetric: bool = False, lm_head: bool = True) -> nn.Module:
    """Quantize ``model``'s input embedding table in place (RTN on the babai grid).

    Every module holding the same Parameter (a tied ``lm_head``) gets the quantized one too,
    so the tie is kept and the lm_head runs through ``babai::linear``. An untied output
    embedding (``nn.Linear`` ``lm_head`` with its own weight) is quantized with the same
    grid when ``lm_head`` is true. Returns ``model``.
    """
    config = babai_embedding_config(bits, group_size, symmetric)
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    if emb is None:
        found = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        if len(found) != 1:
            raise BabaiError(f"found {len(found)} nn.Embedding modules and no "
                             "get_input_embeddings(): use quantize_(model, "
                             "babai_embedding_config(...), filter_fn=...) to pick them")
        emb = found[0]
    if not isinstance(emb, nn.Embedding):
        raise BabaiError(f"the input embedding is a {type(emb).__name__}, not an "
                         "nn.Embedding: cannot quantize it")
    _check_embedding_module(emb)
    old = emb.weight
    new = nn.Parameter(config.quantize_table(old), requires_grad=False)
    holders = [m for m in model.modules()
               if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight is old]
    for m in holders:
        if isinstance(m, nn.Linear) and m.in_features != new.shape[1]:
            raise BabaiError(f"{type(m).__name__} shares the embedding weight but has "
                             f"in_features={m.in_features}: cannot tie a quantized table")
        m.weight = new
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if (lm_head and isinstance(head, nn.Linear) and head.weight is not new
            and not isinstance(head.weight, BabaiQuantizedTensor)):
        head.weight = nn.Parameter(config.quantize_table(head.weight), requires_grad=False)
    return model
