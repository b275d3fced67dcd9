"""Calibration data as batches of token ids with their attention masks, and the model call.

A batch is ``input_ids`` [b, T] and, when the data is padded, ``attention_mask`` [b, T]
(1 = token, 0 = padding). The mask goes into the model's forward (so attention ignores the
padding, in decoders and encoders alike) and decides which rows enter a Hessian:
``H = Σ_{t : mask_t = 1} x_t x_tᵀ`` — a padded position is no calibration token.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from babai_ao.errors import BabaiError

HINT = "use babai_ao.calibration_windows(tokenizer), or tokenizer(texts, padding=True)"


@dataclass
class Batch:
    """Token ids [b, T] and the attention mask [b, T] (``None``: no padding)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        """Calibration tokens in the batch (non-padded positions)."""
        m = self.attention_mask
        return self.input_ids.numel() if m is None else int(m.bool().sum())


def _ids(t: Any, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.is_floating_point():
        got = (f"a {t.dtype} tensor" if isinstance(t, torch.Tensor) else type(t).__name__)
        raise BabaiError(f"calibration {what} must be integer token-id tensors, got {got}: "
                         f"{HINT}")
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2:
        raise BabaiError(f"calibration {what} must be [n, seq_len], got shape "
                         f"{tuple(t.shape)}: {HINT}")
    return t.to(torch.int64)


def _batch(item: Any) -> Batch:
    if isinstance(item, Mapping):
        if "input_ids" not in item:
            raise BabaiError(f"a calibration dict needs input_ids (got keys {sorted(item)}): "
                             f"{HINT}")
        ids = _ids(item["input_ids"], "input_ids")
        mask = item.get("attention_mask")
        if mask is not None:
            mask = _ids(mask, "attention_mask")
            if mask.shape != ids.shape:
                raise BabaiError(f"attention_mask {tuple(mask.shape)} and input_ids "
                                 f"{tuple(ids.shape)} differ in shape: pass the tokenizer's pair")
        return Batch(ids, mask)
    return Batch(_ids(item, "items"))


def calibration_batches(calibration: Any, batch_size: int) -> list[Batch]:
    """Calibration as a list of batches: ids ``[n, seq_len]`` or one dict with ``input_ids``
    (and ``attention_mask``) split into ``batch_size`` rows each; an iterable of id tensors
    or dicts taken batch by batch."""
    if isinstance(calibration, torch.Tensor) and calibration.is_floating_point():
        raise BabaiError(f"calibration must be token ids [n, seq_len], got a "
                         f"{calibration.dtype} tensor of shape {tuple(calibration.shape)}: "
                         f"{HINT}")
    if isinstance(calibration, (torch.Tensor, Mapping)):
        whole = _batch(calibration)
        masks = (whole.attention_mask.split(batch_size) if whole.attention_mask is not None
                 else [None] * len(whole.input_ids.split(batch_size)))
        batches = [Batch(i, m) for i, m in zip(whole.input_ids.split(batch_size), masks)]
    elif isinstance(calibration, Iterable):
        batches = [_batch(item) for item in calibration]
    else:
        raise BabaiError(f"calibration of type {type(calibration).__name__} is not supported: "
                         f"{HINT}")
    if not batches or any(b.input_ids.numel() == 0 for b in batches):
        raise BabaiError("calibration is empty: pass at least one window of token ids")
    if any(b.tokens == 0 for b in batches):
        raise BabaiError("a calibration batch is all padding (attention_mask is 0 everywhere)")
    return batches


def model_forward(model: nn.Module, batch: Batch) -> Any:
    """``model(input_ids, attention_mask)`` on the model's device; ``use_cache=False`` where
    the forward takes it (decoders: no KV cache is built), encoders without it."""
    device = next(model.parameters()).device
    kwargs: dict[str, Any] = {"input_ids": batch.input_ids.to(device)}
    if batch.attention_mask is not None:
        kwargs["attention_mask"] = batch.attention_mask.to(device)
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    return model(**kwargs)


def token_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows of a layer input ``x`` [b, T, K] (or [b·T, K]) at non-padded positions,
    ``[tokens, K]``: what enters ``H = XᵀX``."""
    if mask is None:
        return x
    keep = mask.to(x.device).bool()
    if tuple(x.shape[:-1]) == tuple(keep.shape):
        return x[keep]
    if x.shape[:-1].numel() == keep.numel():
        return x.reshape(-1, x.shape[-1])[keep.reshape(-1)]
    raise BabaiError(f"a layer input of shape {tuple(x.shape)} does not line up with the "
                     f"attention mask {tuple(keep.shape)}, so its padded rows cannot be left "
                     "out of the Hessian: calibrate without padding (equal-length windows)")
