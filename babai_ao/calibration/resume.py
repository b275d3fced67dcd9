"""A calibration run's resumable state: which blocks are finished, and the next block's inputs.

A directory holds ``state.json`` — ``{"fingerprint", "blocks", "next_block", "rows",
"inputs"}`` — and ``inputs-<b>.pt``, the inputs of block ``b = next_block`` (the outputs of
the quantized blocks before it, with the position embeddings and masks the model passes
its blocks), saved with ``torch.save``. Each is written to a temporary name and renamed, and
``state.json`` last, so a crash at any moment leaves the previous consistent state. The
finished blocks' quantized tensors are the sink's (``BlockStream``), written before the state
names them finished.

Resuming from block ``b`` reruns blocks ``b, b+1, …`` on the very inputs the interrupted run
had computed (float32, bit for bit), so the final codes are those of an uninterrupted run.
The state is resumed only when the fingerprint (model config, quantizer settings, calibration
tokens: ``streaming.fingerprint``) matches; Hessians are not stored — each is rebuilt from
the saved inputs when its block reruns. Size: ``n·T·d·4`` bytes of hidden states (SmolLM2 at
128×512: 151 MB) plus the position embeddings.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from babai_ao.errors import BabaiError

STATE_FILE = "state.json"


def _atomic_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


class CalibrationState:
    """The state kept in ``directory`` (created if missing)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self._fingerprint: str | None = None
        self._blocks = 0

    def bind(self, fingerprint: str, blocks: int) -> None:
        """This run's fingerprint and block count; a saved state of another run is refused."""
        self._fingerprint, self._blocks = fingerprint, blocks
        saved = self._read()
        if saved is not None and (saved["fingerprint"] != fingerprint
                                  or saved["blocks"] != blocks):
            raise BabaiError(f"{self.directory} holds the state of another run (other model, "
                             "settings or calibration data): resume with the same arguments, "
                             "or give a fresh --save-state directory")

    def _read(self) -> dict[str, Any] | None:
        path = self.directory / STATE_FILE
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError:
            raise BabaiError(f"{path} is not JSON: the state is damaged; delete "
                             f"{self.directory} and start again") from None

    @property
    def next_block(self) -> int:
        """First block not finished (0 when nothing is saved)."""
        saved = self._read()
        return 0 if saved is None else int(saved["next_block"])

    def load(self) -> tuple[int, list, list[dict]] | None:
        """``(next block, its inputs, report rows so far)``, or ``None`` if nothing is saved."""
        saved = self._read()
        if saved is None:
            return None
        path = self.directory / saved["inputs"]
        try:
            inputs = torch.load(path, weights_only=True, map_location="cpu")
        except (OSError, RuntimeError, EOFError, ValueError) as e:
            raise BabaiError(f"cannot read {path} ({e}): the state is damaged; delete "
                             f"{self.directory} and start again") from None
        return int(saved["next_block"]), inputs, saved["rows"]

    def save(self, next_block: int, inputs: list, rows: list[dict]) -> None:
        """Record blocks ``< next_block`` as finished, with ``inputs`` for ``next_block``."""
        if self._fingerprint is None:
            raise BabaiError("CalibrationState.save before bind: quantize_model binds it")
        self.directory.mkdir(parents=True, exist_ok=True)
        old = self._read()
        name = f"inputs-{next_block}.pt"
        tmp = self.directory / f".{name}.tmp-{os.getpid()}"
        torch.save(inputs, tmp)
        os.replace(tmp, self.directory / name)
        _atomic_json(self.directory / STATE_FILE, {
            "fingerprint": self._fingerprint, "blocks": self._blocks,
            "next_block": next_block, "rows": rows, "inputs": name})
        if old is not None and old["inputs"] != name:
            (self.directory / old["inputs"]).unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove the state's files (after the run completed); the directory too if empty."""
        saved = self._read()
        if saved is not None:
            (self.directory / saved["inputs"]).unlink(missing_ok=True)
        (self.directory / STATE_FILE).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # holds other files: left alone
            self.directory.rmdir()
