"""Greedy decoding, one token per call, in eager PyTorch, ExecuTorch and onnxruntime.

All three feed the prompt one token at a time (position ``p`` at step ``p``), then feed back
``argmax`` of the last logits; ``n_new`` tokens are generated. Same protocol everywhere, so
the token lists are comparable one to one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from babai_ao.kernels.cpu_int4 import exact_forwards

from babai_ao.errors import BabaiError

Step = Callable[[int, int], torch.Tensor]  # (token, position) -> logits [V]


def greedy(step: Step, prompt: Sequence[int], n_new: int, max_cache_len: int) -> list[int]:
    """``n_new`` greedy tokens after ``prompt`` from a one-token ``step``."""
    if len(prompt) == 0:
        raise BabaiError("greedy decoding needs a non-empty prompt: pass at least one token id")
    if len(prompt) + n_new - 1 > max_cache_len:
        raise BabaiError(f"prompt ({len(prompt)}) + new tokens ({n_new}) exceed the cache "
                         f"({max_cache_len}): export with a larger max_cache_len")
    logits = None
    for pos, tok in enumerate(prompt):
        logits = step(int(tok), pos)
    out: list[int] = []
    for pos in range(len(prompt), len(prompt) + n_new):
        out.append(int(torch.argmax(logits)))
        if len(out) < n_new:
            logits = step(out[-1], pos)
    return out


def _ids(tok: int, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([[tok]], dtype=torch.long), torch.tensor([pos], dtype=torch.long)


def greedy_eager(model: torch.nn.Module, prompt: Sequence[int], n_new: int,
                 max_cache_len: int = 64) -> list[int]:
    """Eager decoding through the same static-cache wrapper that is exported."""
    from .llm import static_cache_module

    wrapper = static_cache_module(model, max_cache_len)

    def step(tok: int, pos: int) -> torch.Tensor:
        with torch.no_grad(), exact_forwards():  # the exported graphs' exact arithmetic
            ids, cache_position = _ids(tok, pos)
            return wrapper(input_ids=ids, cache_position=cache_position)[0, -1]

    return greedy(step, prompt, n_new, max_cache_len)


def executorch_step(path: str | Path) -> Step:
    from .executorch import load_method

    method = load_method(path)
    return lambda tok, pos: method.execute(list(_ids(tok, pos)))[0][0, -1].clone()


def greedy_executorch(path: str | Path, prompt: Sequence[int], n_new: int,
                      max_cache_len: int = 64) -> list[int]:
    """Decoding with a ``.pte`` from ``export_llm_executorch`` (cache state in the runtime)."""
    return greedy(executorch_step(path), prompt, n_new, max_cache_len)


def onnx_step(path: str | Path, threads: int | None = None) -> Step:
    from .onnx import ort_session

    sess = ort_session(path, threads)
    inputs = sess.get_inputs()
    kv = [np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32)
          for i in inputs[2:]]

    def step(tok: int, pos: int) -> torch.Tensor:
        ids, cp = _ids(tok, pos)
        feed = {inputs[0].name: ids.numpy(), inputs[1].name: cp.numpy()}
        feed.update({i.name: t for i, t in zip(inputs[2:], kv)})
        logits, *new_kv = sess.run(None, feed)
        kv[:] = new_kv
        return torch.from_numpy(np.asarray(logits))[0, -1]

    return step


def greedy_onnx(path: str | Path, prompt: Sequence[int], n_new: int,
                max_cache_len: int = 64) -> list[int]:
    """Decoding with an ``.onnx`` from ``export_llm_onnx`` (cache carried in Python)."""
    return greedy(onnx_step(path), prompt, n_new, max_cache_len)
