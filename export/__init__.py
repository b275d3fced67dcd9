"""Export of babai-quantized models: ExecuTorch ``.pte`` and ONNX, weights kept quantized.

``to_executorch`` and ``to_onnx`` import their toolchains on first use.

This folder is installed as ``babai_ao.export``; imported as top-level ``export`` it hands
over to an installed package of that name, if any (``babai_ao._root_folders``).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "to_executorch": "executorch",
    "to_onnx": "onnx",
    "ExportReport": "report",
    "export_llm_executorch": "llm",
    "export_llm_onnx": "llm",
    "greedy_eager": "generate",
    "greedy_executorch": "generate",
    "greedy_onnx": "generate",
}
__all__ = list(_LAZY)

if __name__ != "babai_ao.export":
    import os as _os
    import runpy as _runpy

    # run the helper file alone: importing babai_ao here, in the middle of the importer's
    # own import (transformers' modeling_utils imports kernels), would re-enter it
    _helper = _os.path.join(_os.path.dirname(__file__), _os.pardir, "babai_ao", "_root_folders.py")
    _runpy.run_path(_helper)["hand_over"](__name__, __file__)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'babai_ao.export' has no attribute {name!r}")
