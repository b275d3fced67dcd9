"""Run a function when a module of another package finishes importing (at once if it has).

``import babai_ao`` must make plain Hugging Face calls work — ``from_pretrained`` of a saved
babai-ao model needs ``babai_ao.ao.config`` on torchao's module allow-list, and
``model.save_pretrained`` needs babai-ao's save path — without importing torchao or
transformers itself (``babai_ao.kernels`` stays importable with torch + triton only). So the
package registers callbacks here: a finder first on ``sys.meta_path`` waits for the named
module, lets its own loader run it, then calls the callback with the module.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Callable, Sequence

Callback = Callable[[types.ModuleType], None]


class _CallAfter(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, callback: Callback) -> None:
        self.name, self.callback = name, callback

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: types.ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # one shot; the search below must not find us again
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        run, callback = spec.loader.exec_module, self.callback

        def exec_module(module: types.ModuleType) -> None:
            run(module)
            callback(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def after_import(name: str, callback: Callback) -> None:
    """Call ``callback(module)`` once module ``name`` is imported (now, if it already is)."""
    module = sys.modules.get(name)
    if module is not None:
        callback(module)
        return
    if not any(isinstance(f, _CallAfter) and f.name == name and f.callback is callback
               for f in sys.meta_path):
        sys.meta_path.insert(0, _CallAfter(name, callback))
