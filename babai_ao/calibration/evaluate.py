"""Perplexity on non-overlapping windows (protocol P1).

``PPL = exp(mean_w loss_w)`` where ``loss_w = model(ids_w, labels=ids_w).loss`` is the mean
next-token cross-entropy inside window ``w`` (windows ``[w·L, (w+1)·L)``, no overlap, no
context carried between windows). P1: WikiText-2 raw test, ``L = 2048``, the first 40 windows.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from babai_ao.errors import BabaiError


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def window_losses(model: torch.nn.Module, ids: torch.Tensor, windows: int | None = 40,
                  seq_len: int = 2048, progress: bool = True) -> list[float]:
    """Mean cross-entropy of each of the first ``windows`` windows (``None``: all full ones)."""
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
        with torch.no_grad():
            for w in steps:
                x = ids[w * seq_len : (w + 1) * seq_len].unsqueeze(0).to(device)
                losses.append(float(model(input_ids=x, labels=x, use_cache=False).loss))
    finally:
        model.train(was_training)
    return losses


def perplexity(model: torch.nn.Module, tokens: Any, windows: int | None = 40,
               seq_len: int = 2048, progress: bool = True) -> float:
    """P1 perplexity of ``model``; ``tokens`` is a token-id tensor or the model's tokenizer
    (then WikiText-2 raw test, see ``babai_ao.calibration.data.test_tokens``)."""
    if not isinstance(tokens, torch.Tensor):
        from .data import test_tokens

        tokens = test_tokens(tokens)
    losses = window_losses(model, tokens, windows, seq_len, progress)
    return math.exp(sum(losses) / len(losses))
