"""The checkout's top-level folders never shadow installed packages of the same name.

``kernels/``, ``passes/`` and ``export/`` install as ``babai_ao.*``; with the repository
root on ``sys.path`` (``python -m pytest``, ``python -c`` there) Python finds them under the
bare names first. transformers ≥ 5.25 imports the PyPI ``kernels`` package, so each folder
hands over to the installed package (``babai_ao._root_folders``). Every check runs in a
subprocess started in the repository root, as a user's ``python -c`` would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_in_root(code: str, *, extra_path: Path | None = None) -> str:
    env = dict(os.environ)
    env.pop("PYTHONSAFEPATH", None)  # the root must be on sys.path, as for `python -m pytest`
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_transformers_and_babai_ao_import_from_the_repository_root() -> None:
    """The issue's import line, then ``import kernels`` is the PyPI distribution."""
    out = run_in_root(f"""
        import sys
        assert sys.path[0] in ("", {str(ROOT)!r}), sys.path[:2]  # the root is on sys.path
        import transformers.models.llama.modeling_llama, transformers.models.bert.modeling_bert
        import babai_ao, babai_ao.kernels, babai_ao.export, babai_ao.passes
        import importlib.metadata, kernels
        from kernels import CUDAProperties  # what transformers imports from it
        assert importlib.metadata.version("kernels")
        assert not kernels.__file__.startswith({str(ROOT / 'kernels')!r}), kernels.__file__
        assert babai_ao.kernels.__file__.startswith({str(ROOT / 'kernels')!r})
        assert hasattr(babai_ao.kernels, "linear_triton") and not hasattr(kernels, "linear_triton")
        import torch
        assert hasattr(torch.ops.babai, "linear")
        print(kernels.__file__)
    """)
    assert "site-packages" in out


def test_kernels_imported_before_babai_ao_is_the_installed_one() -> None:
    """transformers may import ``kernels`` first; babai-ao's ops then register once, later."""
    run_in_root("""
        import kernels
        import babai_ao.kernels, babai_ao.ao.ops, torch
        assert kernels is not babai_ao.kernels
        assert not any(m.startswith("kernels.") and "babai" in m for m in __import__("sys").modules)
        torch.ops.babai.linear  # registered exactly once (a second registration raises)
    """)


def test_an_installed_passes_package_wins(tmp_path: Path) -> None:
    """Any package named like a top-level folder is the one ``import NAME`` gives."""
    (tmp_path / "passes").mkdir()
    (tmp_path / "passes" / "__init__.py").write_text("ORIGIN = 'installed'\n")
    run_in_root("""
        import passes
        assert passes.ORIGIN == "installed", passes.__file__
        import babai_ao.passes
        assert callable(babai_ao.passes.install) and babai_ao.passes is not passes
    """, extra_path=tmp_path)


def test_a_folder_name_without_an_installed_package_is_not_found() -> None:
    """``import export`` with no such package: ModuleNotFoundError, babai_ao.export intact."""
    run_in_root("""
        import sys
        try:
            import export
        except ModuleNotFoundError as e:
            assert e.name == "export" and "babai_ao.export" in str(e), e
        else:
            raise AssertionError("the checkout's export/ was imported as top-level export")
        assert "export" not in sys.modules
        import babai_ao.export
        from babai_ao.export import to_onnx
        assert callable(to_onnx)
    """)


def test_transformers_modeling_utils_first_then_babai_ao() -> None:
    """transformers' modeling_utils imports ``kernels`` half-way through its own import; the
    hand-over must not run babai_ao's ``__init__`` then (its hooks need the finished module)."""
    run_in_root("""
        from transformers.modeling_utils import PreTrainedModel
        import babai_ao
        assert hasattr(PreTrainedModel.save_pretrained, "__wrapped__")  # babai-ao's save route
    """)
