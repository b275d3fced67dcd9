"""Perplexity on non-overlapping windows (protocol P1).

``PPL = exp(mean_w loss_w)`` where ``loss_w = model(ids_w, labels=ids_w).loss`` is the mean
next-token cross-entropy inside window ``w`` (windows ``[w·L, (w+1)·L)``, no overlap, no
context carried between windows). P1: WikiText-2 raw test, ``L = 2048``, the first 40 windows.

``cpu_kernel="exact"`` (the default) evaluates a quantized model on the CPU with the exact
fp32 path (``babai_ao.kernels.cpu_int4.exact_forwards``: the model's own numbers, comparable
with every P1 row); ``"auto"`` with the process's CPU kernel mode (by default the faster
bf16-activation int4pack path, whose perplexity differs slightly).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from babai_ao.errors import BabaiError
from babai_ao.kernels import cpu_int4

CPU_KERNELS = ("exact", "auto")


def _kernel_scope(cpu_kernel: str) -> Any:
    """The forwards' CPU kernel scope: ``exact_forwards()`` or, for ``"auto"``, none."""
    if cpu_kernel not in CPU_KERNELS:
        raise BabaiError(f"cpu_kernel={cpu_kernel!r} is unknown: use one of {CPU_KERNELS}")
    return cpu_int4.exact_forwards() if cpu_kernel == "exact" else contextlib.nullcontext()


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def window_losses(model: torch.nn.Module, ids: torch.Tensor, windows: int | None = 40,
                  seq_len: int = 2048, progress: bool = True, cpu_kernel: str = "exact"
                  ) -> list[float]:
    """Mean cross-entropy of each of the first ``windows`` windows (``None``: all full ones);
    ``cpu_kernel``: module docstring."""
    scope = _kernel_scope(cpu_kernel)
    ids = ids.reshape(-1)
    available = ids.numel() // seq_len
    count = available if windows is None else int(windows)
    if count <= 0 or count > available:
        raise BabaiError(f"asked for {windows} windows of {seq_len} tokens but the text holds "
                         f"{available}: pass windows <= {available} (or None for all)")
    device = _model_device(model)
    losses: list[float] = []
    steps = range(count)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"perplexity ({seq_len}-token windows)", unit="win")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), scope:
            for w in steps:
                x = ids[w * seq_len : (w + 1) * seq_len].unsqueeze(0).to(device)
                losses.append(float(model(input_ids=x, labels=x, use_cache=False).loss))
    finally:
        model.train(was_training)
    return losses


def perplexity(model: torch.nn.Module, tokens: Any, windows: int | None = 40,
               seq_len: int = 2048, progress: bool = True, cpu_kernel: str = "exact") -> float:
    """P1 perplexity of ``model``; ``tokens`` is a token-id tensor or the model's tokenizer
    (then WikiText-2 raw test, see ``babai_ao.calibration.data.test_tokens``); ``cpu_kernel``:
    ``"exact"`` or ``"auto"`` (module docstring)."""
    if not isinstance(tokens, torch.Tensor):
        from .data import test_tokens

        tokens = test_tokens(tokens)
    losses = window_losses(model, tokens, windows, seq_len, progress, cpu_kernel)
    return math.exp(sum(losses) / len(losses))
