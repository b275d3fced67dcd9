"""Smoke runs of benchmark scripts meant for a lent GPU, on CPU with tiny shapes, so they
do not rot between GPU sessions (speed is not checked here: see BENCHMARKS.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_decode_llama_runs_on_cpu(tmp_path):
    out = tmp_path / "decode.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode_llama.py"),
                          "--config", "tiny", "--device", "cpu", "--tokens", "4",
                          "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    assert row["packed_linears"] == 14  # 7 linears × 2 blocks; the output head stays bf16
    assert row["bf16_tok_s"] > 0 and row["babai4_tok_s"] > 0
