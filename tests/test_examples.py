"""Every example in small mode, and the README's quickstart block, run as real scripts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("[0-9][0-9]_*.py"))


def run_script(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def quickstart_code(readme: str) -> str:
    """The first ```python block after the ``## Quickstart`` heading (before the next ##)."""
    section = re.search(r"^## Quickstart[^\n]*\n(.*?)(?=^## |\Z)", readme, re.S | re.M)
    assert section, "README.md has no '## Quickstart' section"
    block = re.search(r"^```python\n(.*?)^```", section.group(1), re.S | re.M)
    assert block, "the Quickstart section of README.md has no ```python block"
    return block.group(1)


def test_quickstart_extraction():
    text = "# x\n## Other\n```python\nno\n```\n## Quickstart\ntext\n```python\nyes = 1\n```\n"
    assert quickstart_code(text) == "yes = 1\n"
    with pytest.raises(AssertionError, match="no ```python block"):
        quickstart_code("## Quickstart\n## Next\n```python\nx\n```\n")


def test_examples_present():
    names = [p.name for p in EXAMPLES]
    assert names == ["01_quantize_plain_pytorch.py", "02_sequential_calibration.py",
                     "03_compile_inference.py", "04_export_executorch.py",
                     "05_export_onnx.py", "06_load_checkpoint.py", "07_cpu_inference.py"]


@pytest.mark.model
def test_readme_quickstart_runs(tmp_path):
    code = quickstart_code((ROOT / "README.md").read_text(encoding="utf-8"))
    script = tmp_path / "quickstart.py"
    script.write_text(code)
    res = run_script([str(script)], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| layer | tr(D) |" in res.stdout and "BabaiQuantizedTensor" in res.stdout


@pytest.mark.model
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_small(path, tmp_path):
    res = run_script([str(path), "--small"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip(), "the example printed nothing"
