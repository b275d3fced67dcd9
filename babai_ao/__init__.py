"""babai-ao: weight quantization with Babai's nearest-plane algorithm (GPTQ ≡ Babai).

The math (``quantize_weight``, ``babai_nearest_plane``) needs torch alone. Names that
need torchao or transformers are imported lazily, so ``babai_ao.kernels`` stays importable
with torch + triton only.
"""

from __future__ import annotations

import importlib
from typing import Any

from .babai import babai_nearest_plane, nearest_plane
from .errors import BabaiError
from .grid import Grid
from .hessian import HessianAccumulator
from .ldl import ORDERS, quantization_order
from .quantize import Certificate, QuantizedWeight, quantize_weight

__version__ = "0.1.0"

# name -> module that defines it (imported on first access)
_LAZY = {
    "BabaiConfig": "config",
    "babai_config": "config",
    "BabaiQuantizedTensor": "tensor",
    "quantize_model": "calibrate",
    "calibration_windows": "data",
    "load_smollm2": "models",
    "perplexity": "evaluate",
    "quantize_embeddings_": "embedding",
    "babai_embedding_config": "embedding",
    "BabaiEmbeddingConfig": "embedding",
    "prepare_cpu": "kernels.prepare",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'babai_ao' has no attribute {name!r}")


__all__ = [
    "BabaiError",
    "Certificate",
    "Grid",
    "HessianAccumulator",
    "ORDERS",
    "QuantizedWeight",
    "babai_nearest_plane",
    "nearest_plane",
    "quantization_order",
    "quantize_weight",
    *_LAZY,
]
