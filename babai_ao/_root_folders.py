"""The checkout's top-level ``kernels/``, ``passes/`` and ``export/`` under their own names.

Those folders are installed as ``babai_ao.kernels``, ``babai_ao.passes`` and
``babai_ao.export`` (``pyproject.toml``'s ``package-dir``). But whenever the repository root
is on ``sys.path`` (``python -m pytest``, ``python -c`` or a REPL started there), Python finds
them first under the bare names ``kernels``, ``passes`` and ``export`` — and ``kernels`` is a
PyPI package that transformers ≥ 5.25 requires and imports. So each folder's ``__init__``
runs its own body only under its ``babai_ao.*`` name; under the bare name it runs this file
alone (``runpy``: not as part of ``babai_ao``, whose ``__init__`` must not run inside another
package's half-finished import) and calls :func:`hand_over`, which loads the installed package of that name from the rest of
``sys.path`` (the root left out) and puts it in ``sys.modules`` in the folder's place.
``import kernels`` then returns PyPI's module: importlib hands back whatever
``sys.modules[name]`` holds once the module body has run. With no such package installed it
raises ``ModuleNotFoundError`` as for any missing module, and babai-ao's ops are never
registered a second time from a second copy of these modules.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def hand_over(name: str, init_file: str) -> None:
    """Replace the folder module ``name`` (``init_file``: its ``__init__.py``) in
    ``sys.modules`` by the package ``name`` found on ``sys.path`` outside the repository root."""
    root = os.path.realpath(os.path.dirname(os.path.dirname(init_file)))
    elsewhere = [p for p in sys.path
                 if isinstance(p, str) and os.path.realpath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, elsewhere)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(
            f"No module named {name!r} (the checkout's {name}/ folder is babai_ao.{name}: "
            f"import babai_ao.{name}, or install the package {name!r})", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
