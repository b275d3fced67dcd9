"""Module paths of the flat layout, kept importable after the move into subpackages.

Until 0.1.0's re-layout every module sat directly in ``babai_ao/``. Those paths live on in
files people keep: ``torch.save`` pickles name ``babai_ao.tensor.BabaiQuantizedTensor`` and
``babai_ao.hptq_tensor.HuffmanQuantizedTensor``, and scripts import ``babai_ao.calibrate``
or ``babai_ao.hf``. :func:`install` puts a finder on ``sys.meta_path`` that answers an old
path with the module now holding that code — the same module object, so classes, op
registrations and monkeypatches are shared — and :func:`old_names` gives the pickle names a
class had, for ``torch.serialization.add_safe_globals`` (``weights_only`` loads).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

# old flat module -> the module that holds its code now (split modules: the main part)
MOVED = {
    **{f"babai_ao.{m}": f"babai_ao.lattice.{m}"
       for m in ("grid", "hessian", "ldl", "babai", "refine", "quantize")},
    **{f"babai_ao.{m}": f"babai_ao.formats.{m}"
       for m in ("packing", "outliers", "ssqr", "huffman", "hptq", "search", "accounting")},
    **{f"babai_ao.{m}": f"babai_ao.ao.{m}"
       for m in ("ops", "tensor", "hptq_tensor", "embedding", "config", "observe",
                 "integration")},
    **{f"babai_ao.{m}": f"babai_ao.calibration.{m}" for m in ("data", "models", "evaluate")},
    "babai_ao.calibrate": "babai_ao.calibration.sequential",
    "babai_ao.hf": "babai_ao.checkpoints.hf",
    **{f"babai_ao.{m}": f"babai_ao.cli.{m}" for m in ("demo", "runs", "plots")},
}


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old path as the module it moved to (registered under both names)."""

    def find_spec(self, fullname: str, path: object = None,
                  target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = importlib.import_module(MOVED[spec.name])
        self._own_spec = module.__spec__  # importlib overwrites __spec__ with the old name's
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run: the module already ran under its new name; its spec is restored."""
        module.__spec__ = self._own_spec


def install() -> None:
    """Put the finder first on ``sys.meta_path``, once: an old path always means the moved
    module, even where a stale file of that name is left on disk from an older install."""
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())


def old_names(cls: type) -> list[tuple[type, str]]:
    """``(cls, "old.module.Name")`` for every old path of ``cls``'s module."""
    return [(cls, f"{old}.{cls.__qualname__}") for old, new in MOVED.items()
            if new == cls.__module__]
