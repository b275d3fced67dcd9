"""The package layout: subpackages import only downward, old module paths still import,
and the public API is where the README says it is."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import babai_ao
from babai_ao import _moved

PACKAGE = Path(__file__).resolve().parents[1] / "babai_ao"
# each subpackage may import from the ones listed before it (and babai_ao.errors)
LAYERS = ["lattice", "formats", "ao", "calibration", "checkpoints", "cli"]
SIDE = {"kernels": "ao", "passes": "ao", "export": "ao"}  # top-level folders, beside ``ao``


def imported_subpackages(path: Path) -> set[str]:
    """``babai_ao.<sub>`` names a module imports (absolute, or relative from its package)."""
    here = path.relative_to(PACKAGE).parts[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                continue  # its own subpackage
            mod = node.module or ""
            if node.level == 0 and mod.startswith("babai_ao."):
                names.add(mod.split(".")[1])
            elif node.level == 0 and mod == "babai_ao":  # a lazy top-level name: its home
                names.update(babai_ao._LAZY.get(a.name, a.name).split(".")[0]
                             for a in node.names)
            elif node.level > 1:
                raise AssertionError(f"{path}: import {'.' * node.level}{mod}: use babai_ao.…")
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names
                         if a.name.startswith("babai_ao."))
    return names - {here}


@pytest.mark.parametrize("sub", LAYERS)
def test_subpackages_import_only_downward(sub: str) -> None:
    allowed = set(LAYERS[:LAYERS.index(sub)]) | {"errors", "_moved", "__version__"}
    allowed |= {k for k, v in SIDE.items() if v in allowed or v == sub}
    for path in sorted((PACKAGE / sub).glob("*.py")):
        bad = imported_subpackages(path) - allowed
        assert not bad, f"{path.name} imports babai_ao.{sorted(bad)}: a layer above {sub}"


@pytest.mark.parametrize("sub", LAYERS)
def test_each_subpackage_says_what_lives_there(sub: str) -> None:
    doc = importlib.import_module(f"babai_ao.{sub}").__doc__ or ""
    assert len(doc.split()) > 40, f"babai_ao/{sub}/__init__.py needs its paragraph"
    modules = {p.stem for p in (PACKAGE / sub).glob("*.py")} - {"__init__"}
    unnamed = {m for m in modules if f"``{m}``" not in doc}
    assert not unnamed, f"babai_ao/{sub}/__init__.py does not name {sorted(unnamed)}"


def test_no_flat_modules_left() -> None:
    flat = {p.stem for p in PACKAGE.glob("*.py")}
    assert flat == {"__init__", "__main__", "errors", "_moved", "_root_folders",
                    "_after_import"}, flat


def test_old_module_paths_are_the_moved_modules() -> None:
    """In a fresh process every old flat path imports, as the very module it moved to."""
    code = textwrap.dedent("""
        import importlib, sys
        from babai_ao._moved import MOVED
        for old, new in MOVED.items():
            a, b = importlib.import_module(old), importlib.import_module(new)
            assert a is b and sys.modules[old] is b, old
            assert b.__spec__.name == new and b.__name__ == new, (old, b.__spec__)
        import babai_ao.calibrate as c, babai_ao.hf as hf
        assert callable(c.quantize_model) and callable(c.decoder_blocks)
        assert callable(hf.save_pretrained) and callable(hf.from_pretrained)
        from babai_ao.tensor import BabaiQuantizedTensor
        from babai_ao.ao.tensor import BabaiQuantizedTensor as New
        assert BabaiQuantizedTensor is New
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def test_every_old_path_has_a_target_module() -> None:
    for old, new in _moved.MOVED.items():
        assert (PACKAGE.parent / (new.replace(".", "/") + ".py")).is_file(), (old, new)
        assert not (PACKAGE.parent / (old.replace(".", "/") + ".py")).exists(), old


def test_public_api_names() -> None:
    from babai_ao import cli, export, hf

    for name in ("quantize_weight", "babai_config", "quantize_model", "BabaiQuantizedTensor",
                 "BabaiConfig", "calibration_windows", "load_smollm2", "perplexity",
                 "quantize_embeddings_", "prepare_cpu", "Certificate", "BabaiError"):
        assert getattr(babai_ao, name) is not None, name
    assert callable(hf.save_pretrained) and callable(hf.load_state_dict)
    assert callable(export.to_onnx) and callable(export.to_executorch)
    assert cli.main(["--version"]) == 0
