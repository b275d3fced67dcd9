"""babai-ao's C++ CPU ops (``csrc/``), built on first use and registered as ``babai_cpu::``.

``torch.utils.cpp_extension.load`` compiles ``csrc/*.cpp`` once per machine (≈ 20 s with g++
and the ``ninja`` wheel, a dependency; cached under ``TORCH_EXTENSIONS_DIR`` or
``~/.cache/torch_extensions``, rebuilt when the source changes) with ``-O3 -march=native`` (the build runs where the op runs; AVX-512 code where the
CPU has it, a portable loop elsewhere) and OpenMP (``at::parallel_for`` over torch's threads).
Each op has a fake kernel (shapes only), so ``torch.compile`` puts it in its graph as one call.

:func:`load` returns whether the ops are there. Where they cannot be built (no C++ compiler)
it returns ``False`` with one warning naming the fix, decided once per process, and the
callers keep their aten forms (``kernels.cpu_hptq``: the int8 path); ``BABAI_CPU_CPP=0``
turns the ops off without a warning.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from pathlib import Path

import torch

SOURCES = (Path(__file__).parent / "csrc" / "hptq_linear.cpp",)
NAME = "babai_cpu_ops"
_lock = threading.Lock()
_state: dict[str, object] = {}


def load() -> bool:
    """Build (first time on this machine) and load the ``babai_cpu::`` ops; ``False`` where
    they cannot be (warned once) or ``BABAI_CPU_CPP=0``."""
    if "ok" in _state:
        return bool(_state["ok"])
    with _lock:
        if "ok" not in _state:
            _state["ok"] = _build()
    return bool(_state["ok"])


def _build() -> bool:
    if os.environ.get("BABAI_CPU_CPP", "1") == "0":
        return False
    if _registered():  # loaded by another copy of this module
        return True
    try:
        from torch.utils import cpp_extension

        _ninja_on_path()
        _note_first_build(cpp_extension)
        cpp_extension.load(NAME, [str(p) for p in SOURCES], is_python_module=False,
                           extra_cflags=["-O3", "-march=native", "-fopenmp"],
                           extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as err:  # no compiler, headers or OpenMP: keep the aten forms
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        warnings.warn(f"babai-ao's C++ CPU kernels could not be built ({first}); HPTQ layers "
                      "take the slower int8 CPU path: install a C++ compiler (g++) to use "
                      "them, or set BABAI_CPU_CPP=0 to silence this", stacklevel=3)
        return False
    _register_fakes()
    return True


def _note_first_build(cpp_extension) -> None:
    """One line on stderr when nothing is built yet on this machine (the first HPTQ forward
    on CPU then pauses ≈ 20 s)."""
    try:
        built = Path(cpp_extension._get_build_directory(NAME, False)) / f"{NAME}.so"
    except Exception:  # a private helper of torch: never fail the build over the note
        return
    if not built.exists():
        print(f"babai-ao: building the C++ CPU kernel for HPTQ layers (once per machine, "
              f"≈ 20 s) into {built.parent}", file=sys.stderr, flush=True)


def _registered() -> bool:
    return hasattr(torch.ops.babai_cpu, "hptq_linear")


def _ninja_on_path() -> None:
    """The ``ninja`` wheel's binary on ``PATH`` (a venv's ``bin`` is not there unless the venv
    is activated; torch's build calls ``ninja`` by name)."""
    try:
        import ninja
    except ImportError:
        return
    bin_dir = getattr(ninja, "BIN_DIR", None)
    if bin_dir and bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])


def _register_fakes() -> None:
    @torch.library.register_fake("babai_cpu::hptq_linear")
    def _(x, layout, bias, out_features):
        return x.new_empty((*x.shape[:-1], out_features))
