"""Streamed (larger-than-memory) calibration: parameters on the meta device, each block's
weights read from the checkpoint only while that block is calibrated.

``empty_model(config)`` builds the transformers model with every *parameter* on torch's
``meta`` device (no storage) while buffers are built on the CPU as usual, so values computed
at construction and never stored in a checkpoint (rotary ``inv_freq``) are right.
A ``WeightSource`` maps parameter names to tensors read on demand: ``SafetensorsSource``
(the ``*.safetensors`` shards of a directory, each tensor read with ``safe_open`` and the
file closed again) or ``GGUFSource`` (a ``.gguf`` file: tensors dequantized one at a time,
names mapped and Llama's q/k row permutation undone with transformers' own GGUF tables, so
the values equal ``from_pretrained(..., gguf_file=...)``'s).

``BlockStream`` is what ``quantize_model(..., stream=...)`` drives:

- ``begin``: checks every parameter is in the source with the model's shape (one-line
  ``BabaiError`` otherwise, before any work); resumes from a ``CalibrationState`` if one holds
  finished blocks, else materializes the non-block parameters (embedding, …), captures the
  first block's inputs, and returns those parameters to ``meta``;
- ``load_block(b)``: reads block ``b``'s parameters into it (CPU, float32);
- ``finish_block(b, …)``: hands the quantized block's tensors to the ``BlockSink`` (the
  upper layer's writer, e.g. ``babai_ao.checkpoints.streamed.ShardWriter``), records the
  block in the state (next block's inputs and the report rows), and puts the block's
  original meta parameters back, so the quantized tensors are freed.

Resident memory: one block's weights (float, then quantized) + one batch's forward
temporaries + the non-block parameters only while the first block's inputs are captured.
The calibration activations (inputs and outputs of one block for all windows, ``2·n·T·d·4``
bytes) are **spilled to disk** by default: from the moment the first block's inputs are
captured (and when a saved state is resumed) to the end of the run they live in two files in
a temporary directory ``.babai-spill-*`` under ``spill_dir`` (default: the system's
temporary directory; the CLI: next to ``--out``, or ``--spill-dir``), written batch by batch
as a block's last forward produces them and read batch by batch by every stage forward
(``spill``); the directory is removed when ``quantize_model`` returns, raises or is
interrupted. ``spill=False`` keeps them in memory; the position embeddings and masks, equal
for every batch, are kept once (``shared_inputs``) and always in memory. For that, a
streamed calibration is *lean* by default (``BlockStream(lean=True)``): each stage's forward
reruns the block from its inputs with no recorded outputs (``sequential``'s rerun path,
``replay`` budget 0) instead of the lockstep forwards, whose paused forwards hold every
batch's live activations (SmolLM2 at P1, measured: 2.8 GB over the 0.4 GB bound, about 19 ×
the block's inputs) — same codes, about 1.5 × the forward work (BENCHMARKS.md, "Streaming:
peak memory"). ``lean=False`` uses the in-memory defaults (lockstep; replay; no spilling).
glibc's heap would still grow block after block from fragmentation, so the stream fixes its
mmap threshold when it begins and trims the heap after each block (``allocator``). Measured
on SmolLM2 at P1 (128 × 512 windows, all 30 blocks): 267 MiB above the interpreter's
resident set at the peak, which comes before block 0 (embedding + first inputs), 0.67 × the
issue's bound (BENCHMARKS.md).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from babai_ao.errors import BabaiError

from . import allocator as _allocator
from .resume import CalibrationState
from .spill import SpillDir, SpilledInputs, SpillWriter

BlockInputs = list[tuple[torch.Tensor, tuple, dict]]


class WeightSource(Protocol):
    """Parameter name → tensor, read on demand (CPU)."""

    where: str

    def names(self) -> set[str]: ...

    def read(self, name: str) -> torch.Tensor: ...


class BlockSink(Protocol):
    """Receives each finished block's state dict (quantized weights and float norms)."""

    def write_block(self, index: int, tensors: dict[str, torch.Tensor]) -> None: ...


def empty_model(config: Any) -> nn.Module:
    """The causal-LM of ``config`` with its parameters on ``meta`` and buffers on the CPU;
    tied parameters (``lm_head`` = embedding) tied. Nothing is allocated for parameters."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()
    return model.eval()


class SafetensorsSource:
    """The tensors of a directory's ``*.safetensors`` files (one or many shards)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        from safetensors import SafetensorError, safe_open

        self.where = str(directory)
        files = sorted(Path(directory).glob("*.safetensors"))
        if not files:
            raise BabaiError(f"{directory} holds no .safetensors file: give a transformers "
                             "checkpoint directory or a .gguf file")
        self._file: dict[str, Path] = {}
        for f in files:
            try:
                with safe_open(f, framework="pt") as h:
                    self._file.update({k: f for k in h.keys()})  # noqa: SIM118
            except (SafetensorError, OSError) as e:
                raise BabaiError(f"checkpoint file {f} is unreadable ({e}): repair or "
                                 "re-download it") from None

    def names(self) -> set[str]:
        return set(self._file)

    def shape(self, name: str) -> tuple[int, ...]:
        from safetensors import safe_open

        with safe_open(self._file[name], framework="pt") as h:
            return tuple(h.get_slice(name).get_shape())

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self._file[name], framework="pt", device="cpu") as h:
            return h.get_tensor(name)


class GGUFSource:
    """The tensors of a ``.gguf`` file under ``model``'s parameter names, dequantized to
    float32 one at a time (transformers' name map and tensor processors: Llama's q/k rows
    are un-permuted)."""

    def __init__(self, path: str | os.PathLike, model: nn.Module) -> None:
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            read_field,
        )

        self.where = str(path)
        self._reader = GGUFReader(path)
        arch = read_field(self._reader, "general.architecture")[0]
        self._processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(
            config=model.config.to_dict())
        to_hf = get_gguf_hf_weights_map(model, self._processor)
        stored = {t.name: t for t in self._reader.tensors}
        self._tensors = {hf: stored[g] for g, hf in to_hf.items() if g in stored}

    def names(self) -> set[str]:
        return set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self._tensors[name].shape))  # ggml: fastest first

    def read(self, name: str) -> torch.Tensor:
        import numpy as np
        from gguf import dequantize

        t = self._tensors[name]
        result = self._processor.process(weights=dequantize(t.data, t.tensor_type), name=t.name)
        if result.weights is None:
            raise BabaiError(f"{name}: {self.where}'s architecture stores it across several "
                             "GGUF tensors, which streaming cannot read one by one: convert the "
                             "model to safetensors (from_pretrained + save_pretrained) first")
        return torch.from_numpy(np.copy(result.weights)).to(torch.float32)


def open_source(path: str | os.PathLike, model: nn.Module) -> WeightSource:
    """``GGUFSource`` for a ``.gguf`` file, ``SafetensorsSource`` for a directory."""
    path = Path(path)
    return GGUFSource(path, model) if path.suffix == ".gguf" else SafetensorsSource(path)


def _owned(module: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(name, owner module, attribute)`` of each distinct parameter of ``module``."""
    return [(name, module.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2])
            for name, _ in module.named_parameters()]


def fingerprint(model: nn.Module, batches: Sequence[Any], settings: dict[str, Any]) -> str:
    """SHA-256 of what decides the codes: the model config, quantizer settings, calibration
    token ids and masks. A saved state is resumed only under the same fingerprint."""
    h = hashlib.sha256()
    h.update(model.config.to_json_string(use_diff=False).encode())
    h.update(json.dumps(settings, sort_keys=True, default=repr).encode())
    for b in batches:
        h.update(b.input_ids.contiguous().numpy().tobytes())
        if b.attention_mask is not None:
            h.update(b.attention_mask.contiguous().numpy().tobytes())
    return h.hexdigest()


def _same(value: Any, first: Any) -> Any:
    """``first`` if it holds the same values as ``value`` (tensors, tuples of them)."""
    if isinstance(value, torch.Tensor) and isinstance(first, torch.Tensor):
        same = (value.shape == first.shape and value.dtype == first.dtype
                and torch.equal(value, first))
        return first if same else value
    if isinstance(value, tuple) and isinstance(first, tuple) and len(value) == len(first):
        return tuple(_same(v, f) for v, f in zip(value, first))
    return value


def shared_inputs(inputs: BlockInputs) -> BlockInputs:
    """The blocks' inputs with every tensor besides the hidden states (position embeddings,
    position ids, masks) that equals the first batch's replaced by that very tensor: one
    copy instead of one per batch (SmolLM2 at 128×512: 31 MB of cos/sin saved)."""
    if not inputs:
        return inputs
    _, args0, kwargs0 = inputs[0]
    return [inputs[0]] + [
        (hidden, _same(args, args0), {k: _same(v, kwargs0.get(k)) for k, v in kwargs.items()})
        for hidden, args, kwargs in inputs[1:]]


class BlockStream:
    """Reads a meta model's blocks from ``source`` one at a time (see the module docstring).

    ``sink``: receives each finished block (``None``: the quantized blocks are dropped);
    ``state``: a ``CalibrationState`` to record finished blocks in and resume from.
    ``on_block(b, model)``: called after block ``b`` is loaded (tests use it to check that
    every other block is on ``meta``, or to simulate a crash). ``lean``: calibrate with the
    least activation memory (the module docstring; codes unchanged). ``spill``: keep the
    block's inputs and outputs on disk (``spill.py``; ``None``: when ``lean``), in a
    temporary directory under ``spill_dir`` (``None``: the system's temporary directory).
    ``allocator`` (``allocator.MODES``): ``"mmap"`` fixes glibc's mmap threshold when the
    calibration begins and trims the heap after each block, ``"trim"`` only trims,
    ``"off"`` leaves malloc alone (``allocator.py``; process-wide; no effect on values).
    """

    def __init__(self, source: WeightSource, sink: BlockSink | None = None,
                 state: CalibrationState | None = None,
                 on_block: Callable[[int, nn.Module], None] | None = None,
                 lean: bool = True, spill: bool | None = None,
                 spill_dir: str | os.PathLike | None = None,
                 allocator: str = _allocator.DEFAULT) -> None:
        if spill and not lean:
            raise BabaiError("BlockStream(spill=True, lean=False): the lockstep forwards of a "
                             "non-lean stream hold every batch's activations anyway; use "
                             "lean=True to spill, or spill=False")
        if allocator not in _allocator.MODES:
            raise BabaiError(f"BlockStream(allocator={allocator!r}): choose one of "
                             f"{_allocator.MODES}")
        self.source = source
        self.sink = sink
        self.state = state
        self.on_block = on_block
        self.lean = lean
        self.spill = lean if spill is None else spill
        self.spill_dir = spill_dir
        self.allocator = allocator
        self.resumed_from = 0
        self._spill: SpillDir | None = None
        self._writer: SpillWriter | None = None
        self._model: nn.Module | None = None
        self._stack: nn.ModuleList | None = None
        self._path = ""
        self._meta: dict[tuple[int, str], nn.Parameter] = {}

    # ---- parameters in and out ---------------------------------------------------------
    def _check(self, model: nn.Module) -> None:
        """Every parameter is in the source, with the model's shape (before any work)."""
        have = self.source.names()
        for name, p in model.named_parameters():
            if name not in have:
                raise BabaiError(f"{name} is missing from {self.source.where}: the checkpoint "
                                 "does not match its config; give the complete checkpoint")
            shape = self.source.shape(name)
            if tuple(shape) != tuple(p.shape):
                raise BabaiError(f"{name} in {self.source.where} has shape {tuple(shape)}, the "
                                 f"model's config gives {tuple(p.shape)}: the checkpoint and "
                                 "its config.json do not match")

    def _materialize(self, module: nn.Module, prefix: str, exclude: str | None = None) -> None:
        for name, owner, attr in _owned(module):
            full = f"{prefix}{name}"
            if exclude is not None and full.startswith(exclude):
                continue
            self._meta[(id(owner), attr)] = getattr(owner, attr)
            tensor = self.source.read(full).to(torch.float32)
            setattr(owner, attr, nn.Parameter(tensor, requires_grad=False))

    def _release(self, module: nn.Module) -> None:
        """Put the original meta parameters back (the read or quantized tensors are freed)."""
        for owner in module.modules():
            for attr in list(owner._parameters):
                meta = self._meta.pop((id(owner), attr), None)
                if meta is not None:
                    setattr(owner, attr, meta)

    # ---- what quantize_model calls -----------------------------------------------------
    def begin(self, model: nn.Module, path: str, stack: nn.ModuleList,
              batches: Sequence[Any], settings: dict[str, Any],
              first_inputs: Callable[[], BlockInputs]) -> tuple[int, BlockInputs, list[dict]]:
        """``(first block to calibrate, its inputs, report rows of blocks already done)``."""
        self._model, self._stack, self._path = model, stack, path
        self._check(model)
        if self.allocator == "mmap":
            _allocator.fix_mmap_threshold()
        if self.spill:
            self._spill = SpillDir(self.spill_dir)
        if self.state is not None:
            self.state.bind(fingerprint(model, batches, settings), len(stack))
            saved = self.state.load()
            if saved is not None:
                self.resumed_from = saved[0]
                return saved[0], self._spilled(saved[0], saved[1]), saved[2]
        self._materialize(model, "", exclude=f"{path}.")  # embedding, final norm, head
        try:
            inputs = shared_inputs(first_inputs())
        finally:
            self._release(model)
        return 0, self._spilled(0, inputs), []

    def _spilled(self, b: int, inputs: BlockInputs) -> Sequence[Any]:
        """Block ``b``'s inputs on disk when spilling (the list is dropped), else as given."""
        if self._spill is None:
            return inputs
        return self._spill.spill(f"acts-{b}.bin", inputs)

    def outputs(self, b: int) -> list[torch.Tensor] | SpillWriter:
        """Where block ``b``'s calibration forwards put its outputs (``append``): its spill
        file, or a list in memory."""
        if self._spill is None:
            return []
        if self._writer is not None:
            self._writer.discard()
        self._writer = self._spill.writer(f"acts-{b + 1}.bin")
        return self._writer

    def next_inputs(self, outputs: Sequence[torch.Tensor] | SpillWriter,
                    inputs: Sequence[Any]) -> Sequence[Any]:
        """The next block's inputs: ``outputs`` with the other arguments of ``inputs``; when
        spilling, on disk (``outputs`` written there if the forwards returned a list), and
        the inputs' file deleted."""
        if self._spill is None:
            return [(out, inp[1], inp[2]) for out, inp in zip(outputs, inputs)]
        writer, self._writer = self._writer, None
        if writer is None:
            raise BabaiError("BlockStream.next_inputs before outputs(b): quantize_model calls "
                             "them in order")
        if outputs is not writer:
            for out in outputs:
                writer.append(out)
        if isinstance(inputs, SpilledInputs):
            extras = inputs.extras()
            inputs.remove()
        else:
            extras = [(args, kwargs) for _, args, kwargs in inputs]
        if not len(writer):  # the last block: no next inputs
            writer.discard()
            return []
        return writer.finish(extras)

    def close(self) -> None:
        """Remove the spilled activations (after the run, an error or Ctrl-C) and let glibc
        serve large blocks from its heap again (``allocator.settle_mmap_threshold``)."""
        if self._writer is not None:
            self._writer.discard()
            self._writer = None
        if self._spill is not None:
            self._spill.close()
            self._spill = None
        if self.allocator == "mmap":  # the fixed threshold's time cost ends with the stream
            _allocator.settle_mmap_threshold()

    @property
    def spill_path(self) -> Path | None:
        """The spill directory while the calibration runs."""
        return None if self._spill is None else self._spill.path

    def load_block(self, b: int) -> None:
        self._materialize(self._stack[b], f"{self._path}.{b}.")
        if self.on_block is not None:
            self.on_block(b, self._model)

    def finish_block(self, b: int, rows: list[dict], next_inputs: BlockInputs) -> None:
        """Write block ``b``, record it (with ``rows``: the report rows of blocks ``≤ b``),
        and free its tensors."""
        block = self._stack[b]
        if self.sink is not None:
            self.sink.write_block(b, {f"{self._path}.{b}.{k}": v
                                      for k, v in block.state_dict().items()})
        if self.state is not None:  # (spilled inputs are read into memory to be saved)
            self.state.save(b + 1, list(next_inputs), rows)
        self._release(block)
        if self.allocator != "off":
            _allocator.trim()
