"""Shared real-model fixtures (session-scoped: load once per test run).

``smollm2_small`` is shared: tests that change the model must work on ``copy.deepcopy``.
"""

from __future__ import annotations

import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when its kernels are defined, i.e. at the first import of
# babai_ao.ao.ops in the session: without a GPU every kernel test runs in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2_small():
    """``(model, tokenizer)``: SmolLM2-135M-Instruct cut to its first 2 decoder blocks, fp32."""
    from babai_ao.calibration.models import load_smollm2

    return load_smollm2(num_layers=2)


@pytest.fixture(scope="session")
def calibration_small(smollm2_small) -> torch.Tensor:
    """4 P1-style calibration windows of 128 tokens (wiki.valid.tokens, seed 0)."""
    from babai_ao.calibration.data import calibration_windows

    return calibration_windows(smollm2_small[1], n=4, seq_len=128)


@pytest.fixture(scope="module")
def exact_cpu_kernel():
    """The whole module under ``babai_ao.cpu_kernel("exact")``: for tests whose references
    are a quantized model's exact fp32 numbers (exported graphs keep ``babai::linear``; the
    default CPU path rounds activations to bf16: tests/test_cpu_default_path.py). Use with
    ``pytestmark = pytest.mark.usefixtures("exact_cpu_kernel")``."""
    from babai_ao import cpu_kernel

    with cpu_kernel("exact"):
        yield
