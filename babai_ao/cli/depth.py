"""How much of the model a run measured: the decoder blocks it kept out of the model's.

``--num-layers N`` keeps the first ``N`` blocks; perplexities of such a cut model are not the
model's (SmolLM2 cut to 2 of its 30 blocks scores ~1e8), so every place that shows a run's
numbers names the cut: ``Depth.label`` ("first 2 of 30 blocks"). A run record carries
``num_layers`` (blocks kept), ``model_layers`` (blocks of the model) and ``cut``; records
written before these keys existed read as whole-model runs, or as "first N blocks" when they
hold the requested ``num_layers`` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from babai_ao.errors import BabaiError

from .sources import keep_first_blocks, load_model


@dataclass(frozen=True)
class Depth:
    """``kept`` decoder blocks out of the model's ``total`` (``None``: not known)."""

    kept: int | None = None
    total: int | None = None

    @property
    def cut(self) -> bool:
        """Fewer blocks than the model has (or a cut to a depth whose model is unknown)."""
        return self.kept is not None and (self.total is None or self.kept < self.total)

    @property
    def label(self) -> str:
        """``"first 2 of 30 blocks"`` for a cut model, ``""`` for the whole model."""
        if not self.cut:
            return ""
        of = "" if self.total is None else f" of {self.total}"
        return f"first {self.kept}{of} blocks"

    def note(self) -> str:
        """``"cut model: first 2 of 30 blocks"`` for a cut model, ``""`` otherwise."""
        return f"cut model: {self.label}" if self.cut else ""

    def fields(self) -> dict[str, Any]:
        """The run-record keys: ``num_layers``, ``model_layers``, ``cut``."""
        return {"num_layers": self.kept, "model_layers": self.total, "cut": self.cut}

    def inside(self, outer: Depth) -> Depth:
        """This depth of a model that is itself ``outer``'s kept blocks (a saved cut run)."""
        return Depth(self.kept, outer.total if outer.kept is not None else self.total)

    @classmethod
    def of_record(cls, record: dict[str, Any], key: str = "num_layers") -> Depth:
        """The depth a record's numbers were measured on (``key``: its blocks-kept key)."""
        kept = record.get(key, record.get("num_layers"))
        return cls(kept, record.get("model_layers"))


def ppl_depth(record: dict[str, Any]) -> Depth:
    """The depth a record's perplexity was measured on (``eval --num-layers`` may cut more)."""
    return Depth.of_record(record, "ppl_num_layers")


def block_count(model: nn.Module) -> int | None:
    """Decoder blocks of ``model`` (``None``: no block list found)."""
    from babai_ao.calibration.blocks import decoder_blocks

    try:
        return len(decoder_blocks(model)[1])
    except BabaiError:
        return None


def load_measured(source: str, num_layers: int | None) -> tuple[nn.Module, Any, Depth]:
    """``load_model(source)`` cut to its first ``num_layers`` blocks, and the depth kept."""
    model, tokenizer = load_model(source)
    total = keep_first_blocks(model, num_layers)
    if total is None:
        total = block_count(model)
    kept = total if total is None or num_layers is None else min(num_layers, total)
    return model, tokenizer, Depth(kept, total)
