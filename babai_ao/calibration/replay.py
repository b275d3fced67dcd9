"""Replaying a calibrated block's quantized outputs across its stage forwards.

Sequential calibration reruns a block from its input once per stage. A linear already
quantized in this block sees the same input value in every later forward of the same
batch, so its output is recorded the first time and replayed after (as is a whole attention
or MLP module once all its linears are quantized): the block's linear FLOPs are spent once
instead of once per stage. A recorded output that was modified in place since (its
tensors' version counters moved) is recomputed, and recordings stop at ``REPLAY_BUDGET``
bytes per block.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from .layers import is_quantizable

REPLAY = True  # tests turn it off to compare against plain recomputation
REPLAY_BUDGET = 2 * 2**30  # bytes of recorded outputs per block (SmolLM2 at P1: ~1.1 GB)


def _nbytes(out: Any) -> int:
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(out)
               if isinstance(t, torch.Tensor))


def _versions(out: Any) -> tuple[int, ...]:
    """In-place-write counters of every tensor in a module output."""
    return tuple(t._version for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


class Replay:
    """Outputs of a block's quantized linears, per calibration batch, replayed in the later
    stage forwards of the same block (``batch`` is set by ``_collect`` before each batch).

    Recordings stop at ``budget`` bytes (``None``: ``REPLAY_BUDGET``; the rest is recomputed,
    as without replay), and a linear's recordings are dropped once the module around it is
    replayed whole.
    """

    def __init__(self, budget: int | None = None) -> None:
        self.budget = REPLAY_BUDGET if budget is None else budget
        self.batch = 0
        self.outputs: dict[str, dict[int, tuple[Any, tuple[int, ...]]]] = {}
        self.watched: set[str] = set()
        self.patched: list[nn.Module] = []
        self.nbytes = 0

    def watch(self, linear: nn.Linear, name: str) -> None:
        """From now on ``linear`` (quantized, called once per forward) records or replays."""
        if REPLAY:
            self._patch(linear, name)

    def watch_modules(self, block: nn.Module) -> None:
        """Also replay whole submodules (an attention module, an MLP) once every linear in
        them is quantized and watched: their output is then fixed too, and replaying it skips
        the non-linear work (attention) as well."""
        if not REPLAY:
            return
        for name, module in block.named_modules():
            if (not name or is_quantizable(module) or name in self.watched
                    or any(name.startswith(w + ".") for w in self.watched)):
                continue
            inner = [f"{name}.{n}" for n, m in module.named_modules() if is_quantizable(m)]
            if inner and all(n in self.watched for n in inner):
                self._patch(module, name)
                for n in inner:  # replayed whole from now on: their recordings are unused
                    self.nbytes -= sum(_nbytes(out) for out, _ in self.outputs[n].values())
                    self.outputs[n].clear()

    def _patch(self, module: nn.Module, name: str) -> None:
        compute = module.forward
        seen = self.outputs.setdefault(name, {})

        def forward(*args: Any, **kwargs: Any) -> Any:
            recorded = seen.get(self.batch)
            if recorded is not None and recorded[1] == _versions(recorded[0]):
                return recorded[0]  # untouched since recorded
            out = compute(*args, **kwargs)
            size = _nbytes(out)
            if recorded is not None:
                self.nbytes -= _nbytes(recorded[0])
                del seen[self.batch]
            if self.nbytes + size <= self.budget:
                seen[self.batch] = (out, _versions(out))
                self.nbytes += size
            return out

        module.forward = forward
        self.patched.append(module)
        self.watched.add(name)

    def close(self) -> None:
        for module in self.patched:
            del module.forward  # back to the class's forward
        self.patched.clear()
        self.outputs.clear()
        self.watched.clear()
        self.nbytes = 0
