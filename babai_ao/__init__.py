"""babai-ao: weight quantization with Babai's nearest-plane algorithm (GPTQ ≡ Babai).

The package is layered; each subpackage imports only from the ones above it:

=================  ==========================================================================
``lattice``        the math: Hessians, LDL and orders, nearest plane, refinement, certificates
``formats``        how codes are stored: packing, SSQR outliers, Huffman/HPTQ, bit accounting
``ao``             torch ops and the torchao layer: ``babai::`` ops, tensor subclasses, configs
``calibration``    sequential calibration of whole models, data, model loading, perplexity
``checkpoints``    saving and loading quantized models (transformers / safetensors, torch.save)
``cli``            the product: the ``babai-ao`` command, demo, run records, plots
=================  ==========================================================================

``babai_ao.kernels``, ``babai_ao.passes`` and ``babai_ao.export`` (the repository's
top-level ``kernels/``, ``passes/``, ``export/``) sit beside ``ao``: device kernels, Inductor
passes, ExecuTorch/ONNX export. The math (``quantize_weight``, ``babai_nearest_plane``) needs
torch alone; names that need torchao or transformers are imported on first use, so
``babai_ao.kernels`` stays importable with torch + triton only. Module paths of the flat
layout before these subpackages (``babai_ao.tensor``, ``babai_ao.config`` …) still import,
for old checkpoints and scripts (``babai_ao._moved``).
"""

from __future__ import annotations

import importlib
from typing import Any

from . import _after_import, _moved
from .errors import BabaiError
from .lattice.babai import babai_nearest_plane, nearest_plane
from .lattice.grid import Grid
from .lattice.hessian import HessianAccumulator
from .lattice.ldl import ORDERS, quantization_order
from .lattice.quantize import Certificate, QuantizedWeight, quantize_weight

__version__ = "0.1.0"

_moved.install()


def _allow_babai_config(torchao_config: Any) -> None:
    """torchao rebuilds configs from JSON only from allow-listed modules: add ours, so
    ``from_pretrained`` of a saved babai-ao model finds ``BabaiConfig``."""
    from .ao.integration import CONFIG_MODULE

    torchao_config.ALLOWED_AO_MODULES.add(CONFIG_MODULE)


def _route_save_pretrained(modeling_utils: Any) -> None:
    """``model.save_pretrained`` of a model holding babai-ao weights saves it as babai-ao's."""
    from .checkpoints.hf import patch_save_pretrained

    patch_save_pretrained(modeling_utils.PreTrainedModel)


_after_import.after_import("torchao.core.config", _allow_babai_config)
_after_import.after_import("transformers.modeling_utils", _route_save_pretrained)

# name -> module that defines it (imported on first access)
_LAZY = {
    "BabaiConfig": "ao.config",
    "babai_config": "ao.config",
    "BabaiQuantizedTensor": "ao.tensor",
    "quantize_embeddings_": "ao.embedding",
    "babai_embedding_config": "ao.embedding",
    "BabaiEmbeddingConfig": "ao.embedding",
    "quantize_model": "calibration.sequential",
    "calibration_windows": "calibration.data",
    "load_smollm2": "calibration.models",
    "perplexity": "calibration.evaluate",
    "prepare_cpu": "kernels.prepare",
    "cpu_kernel": "kernels.cpu_int4",
    "set_cpu_kernel": "kernels.cpu_int4",
}


# modules reachable as attributes after a plain ``import babai_ao`` (``babai_ao.hf`` …)
_SUBMODULES = ("lattice", "formats", "ao", "calibration", "checkpoints", "cli", "kernels",
               "passes", "export")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name in _SUBMODULES or f"{__name__}.{name}" in _moved.MOVED:
        return importlib.import_module(f".{name}", __name__)
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
