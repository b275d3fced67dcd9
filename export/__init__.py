"""Export of babai-quantized models: ExecuTorch ``.pte`` and ONNX, weights kept quantized.

``to_executorch`` and ``to_onnx`` import their toolchains on first use.
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


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'babai_ao.export' has no attribute {name!r}")


__all__ = list(_LAZY)
