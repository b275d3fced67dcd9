"""``babai-ao quantize --stream`` / ``--save-state DIR``: quantize a model larger than memory.

The model is built on the meta device (``calibration.streaming.empty_model``) from its
config alone; each block's weights are read from the checkpoint (``smollm2``: its float32
safetensors copy when one exists, else the GGUF; a ``.gguf`` file; a transformers directory)
only while that block is calibrated, then written as its own shard
(``checkpoints.streamed.ShardWriter``) and freed.

Without ``--save-state`` the shards go to the temporary sibling of ``--out``, which becomes
``--out`` only when the run completes (an interrupted run leaves nothing that looks
complete, ``output.atomic_directory``). With ``--save-state DIR`` the shards and the
resumable state (``calibration.resume``) go to ``DIR``: a rerun of the same command resumes
after the last finished block, with the same final codes; once ``--out`` is written, the
state's files are removed. While the run is on, the calibration activations (one block's
inputs and outputs) are kept in a temporary ``.babai-spill-*`` directory next to ``--out``
(or inside ``--spill-dir``), removed when the run ends, fails or is interrupted.
"""

from __future__ import annotations

import argparse
import copy
import shutil
from pathlib import Path
from typing import Any

from .depth import Depth
from .output import atomic_directory, say
from .sources import SMOLLM2, model_config, resolve

SHARDS = "shards"


def checkpoint_of(source: str) -> Path:
    """Where the weights of ``source`` are read from: a directory or a ``.gguf`` file."""
    from babai_ao.calibration.models import fp32_copy_dir

    where = resolve(source)
    if where.kind == SMOLLM2 and any(fp32_copy_dir().glob("*.safetensors")):
        return fp32_copy_dir()
    if where.gguf_file is not None:
        return where.directory / where.gguf_file
    return where.directory


def quantize_streamed(args: argparse.Namespace, config: Any) -> dict[str, Any]:
    """Quantize ``args.model`` block by block into ``args.out``; returns the run record."""
    from transformers import AutoTokenizer

    from babai_ao.calibration.blocks import decoder_blocks
    from babai_ao.calibration.resume import CalibrationState
    from babai_ao.calibration.streaming import BlockStream, empty_model, open_source
    from babai_ao.checkpoints.streamed import ShardWriter, stored_bits_per_weight

    from .quantize import quantize_loaded
    from .runs import RUN_FILE, write_json

    hf_config = copy.deepcopy(model_config(args.model))
    total = int(hf_config.num_hidden_layers)
    if args.num_layers is not None:
        hf_config.num_hidden_layers = min(args.num_layers, total)
        if getattr(hf_config, "layer_types", None):
            hf_config.layer_types = hf_config.layer_types[:args.num_layers]
    kept = int(hf_config.num_hidden_layers)
    model = empty_model(hf_config)
    checkpoint = checkpoint_of(args.model)
    source = open_source(checkpoint, model)
    where = resolve(args.model)
    tokenizer = AutoTokenizer.from_pretrained(
        checkpoint if checkpoint.is_dir() else where.directory, gguf_file=where.gguf_file
        if not checkpoint.is_dir() else None)
    path, stack = decoder_blocks(model)
    state_dir = Path(args.save_state) if args.save_state else None
    out = Path(args.out)
    with atomic_directory(out, args.overwrite) as tmp:
        sink = ShardWriter(state_dir / SHARDS if state_dir else tmp, len(stack))
        state = CalibrationState(state_dir) if state_dir else None
        if state is not None and state.next_block:
            say(f"resuming from {state_dir}: {state.next_block} of {len(stack)} blocks done")
        # the activations spill next to --out (same disk as the output) or into --spill-dir
        stream = BlockStream(source, sink, state,
                             spill_dir=args.spill_dir or out.resolve().parent)
        record = quantize_loaded(model, tokenizer, args, config,
                                 progress=not args.no_progress, stream=stream)
        sink.commit(model, source, tmp, config, path)
        record["avg_bits_per_weight"] = stored_bits_per_weight(tmp)
        record["stream"] = {"checkpoint": str(checkpoint), "resumed_from_block":
                            stream.resumed_from, "save_state": args.save_state,
                            "lean": stream.lean, "spill": stream.spill,
                            "spill_dir": str(args.spill_dir or out.resolve().parent)}
        record.update(Depth(kept, total).fields())
        tokenizer.save_pretrained(tmp)
        write_json(tmp / RUN_FILE, record)
    if state_dir is not None:  # the run is complete: its state is spent
        shutil.rmtree(state_dir / SHARDS, ignore_errors=True)
        state.clear()
    return record
