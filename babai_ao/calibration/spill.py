"""Calibration activations on disk: a streamed block's inputs and outputs, read batch by batch.

Sequential calibration holds two copies of the hidden states of every calibration window: the
block's inputs ``X_b`` and its outputs ``X_{b+1}``, ``n·T·d`` floats each (SmolLM2 at P1's
128×512 windows: 144 MiB each). A spilled stream keeps neither in memory:

- ``SpillWriter`` receives the block's outputs one batch at a time (``append``, what
  ``sequential``'s forwards call) and writes each batch's hidden states, as raw bytes, to the
  end of one file ``acts-<b>.bin``; nothing of it stays in memory;
- ``SpilledInputs`` is the next block's inputs: a read-only sequence of
  ``(hidden, args, kwargs)`` whose item ``i`` reads batch ``i``'s hidden states back from the
  file into a fresh tensor (the very bytes that were written: the codes equal the in-memory
  run's), with that batch's other arguments (position embeddings, masks: one shared copy,
  ``streaming.shared_inputs``) kept in memory;
- ``SpillDir`` is the temporary directory both live in (``.babai-spill-*``): at most two
  activation files at a time (the block's inputs and its outputs, ``2·n·T·d·4`` bytes;
  the inputs' file is deleted once the outputs are complete), removed when the calibration
  ends — normally, on an error or on Ctrl-C (``close``), and at interpreter exit if ``close``
  was never called. The files are plain reads and writes, not memory maps: the bytes pass
  through the page cache, which the kernel may drop, and never count as the process's
  resident memory.

Each stage forward of a lean stream (``sequential``'s rerun path) reads every batch once, so
a block reads its inputs (stages + 1) times — from the page cache while memory allows.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from babai_ao.errors import BabaiError

BlockInput = tuple[torch.Tensor, tuple, dict]
PREFIX = ".babai-spill-"


def _bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor (no copy)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class SpillDir:
    """A fresh temporary directory under ``parent`` (``None``: the system's temporary
    directory, ``TMPDIR``) for one calibration's activation files; ``close`` removes it."""

    def __init__(self, parent: str | os.PathLike | None = None) -> None:
        if parent is not None and not Path(parent).is_dir():
            raise BabaiError(f"spill directory {parent} does not exist or is not a directory: "
                             "create it or give another one")
        try:
            self.path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=parent))
        except OSError as e:
            raise BabaiError(f"cannot create a spill directory in {parent or tempfile.gettempdir()}"
                             f" ({e}): give a writable directory") from None
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.path, ignore_errors=True)

    def file(self, name: str) -> Path:
        return self.path / name

    def writer(self, name: str) -> SpillWriter:
        return SpillWriter(self.file(name))

    def spill(self, name: str, inputs: Sequence[BlockInput]) -> SpilledInputs:
        """``inputs`` (in memory) written to ``name``: the same sequence, read from disk."""
        w = self.writer(name)
        for hidden, _, _ in inputs:
            w.append(hidden)
        return w.finish([(args, kwargs) for _, args, kwargs in inputs])

    def close(self) -> None:
        """Remove the directory and every file in it (idempotent)."""
        self._cleanup()

    @property
    def closed(self) -> bool:
        return not self._cleanup.alive


class SpillWriter:
    """Appends tensors, one per batch, to a file (``append``: the ``list`` interface the
    calibration forwards use for their outputs); ``finish`` makes the readable sequence."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "wb")  # noqa: SIM115  (closed by finish or on error)
        self._layout: list[tuple[int, tuple[int, ...], torch.dtype]] = []
        self._offset = 0

    def append(self, t: torch.Tensor) -> None:
        t = t.detach().contiguous()
        if t.device.type != "cpu":
            t = t.cpu()
        try:
            self._f.write(_bytes(t))
        except OSError as e:
            self._f.close()
            raise BabaiError(f"cannot write activations to {self.path} ({e}): free disk space "
                             "there or give another spill directory") from None
        self._layout.append((self._offset, tuple(t.shape), t.dtype))
        self._offset += t.numel() * t.element_size()

    def __len__(self) -> int:
        return len(self._layout)

    def finish(self, extras: Sequence[tuple[tuple, dict]]) -> SpilledInputs:
        """The written tensors, batch ``i`` paired with ``extras[i]`` (its other arguments)."""
        self._f.close()
        if len(extras) != len(self._layout):
            raise BabaiError(f"{len(self._layout)} spilled batches but {len(extras)} argument "
                             "sets: the block produced an output for some batches only")
        return SpilledInputs(self.path, self._layout, list(extras))

    def discard(self) -> None:
        self._f.close()
        self.path.unlink(missing_ok=True)


class SpilledInputs(Sequence[BlockInput]):
    """A block's inputs read back from a spill file, one batch per item (module docstring)."""

    def __init__(self, path: Path, layout: list[tuple[int, tuple[int, ...], torch.dtype]],
                 extras: list[tuple[tuple, dict]]) -> None:
        self.path, self._layout, self._extras = path, layout, extras

    def __len__(self) -> int:
        return len(self._layout)

    def hidden(self, i: int) -> torch.Tensor:
        """Batch ``i``'s hidden states, read from the file into a new tensor."""
        offset, shape, dtype = self._layout[i]
        t = torch.empty(shape, dtype=dtype)
        view = _bytes(t)
        with open(self.path, "rb") as f:
            f.seek(offset)
            got = f.readinto(view)
        if got != len(view):
            raise BabaiError(f"{self.path} is shorter than written (batch {i}): the spill "
                             "directory was changed during the run; run again")
        return t

    def __getitem__(self, i: int) -> BlockInput:  # type: ignore[override]
        if isinstance(i, slice):
            raise TypeError("SpilledInputs takes one batch index")
        if i < 0:
            i += len(self)
        args, kwargs = self._extras[i]
        return self.hidden(i), args, kwargs

    def __iter__(self) -> Iterator[BlockInput]:
        return (self[i] for i in range(len(self)))

    @property
    def nbytes(self) -> int:
        """Bytes of hidden states on disk."""
        return sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size()
                   for _, s, d in self._layout)

    def extras(self) -> list[tuple[tuple, dict]]:
        return list(self._extras)

    def remove(self) -> None:
        """Delete the file (its block is done)."""
        self.path.unlink(missing_ok=True)
