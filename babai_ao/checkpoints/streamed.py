"""A quantized checkpoint written block by block, as a streamed calibration finishes each block.

``ShardWriter`` is the sink of ``babai_ao.calibration.streaming.BlockStream``: block ``b``'s
tensors (quantized weights flattened the way transformers' torchao quantizer saves them:
``<module>._weight_qdata`` … plus a JSON entry per tensor, with its digest,
``babai_ao.ao.integrity``) go to their own file
``model-<b+1>-of-<B+1>.safetensors`` in ``directory``, written to a temporary name and
renamed. ``commit`` writes the last shard — the parameters outside the blocks (embedding,
final norm, an untied ``lm_head``), read from the weight source — whose metadata holds every
tensor's entry and the full ``tensor_names`` list (transformers and
``hf.verify_checkpoint`` merge the shards' metadata in file order, so the last shard's list
counts), then ``model.safetensors.index.json`` and ``config.json`` (with the
``TorchAoConfig``). The tensors, their metadata and the config are those of
``hf.save_pretrained`` on the same model quantized in memory; only the split into files
differs. Nothing is an index until ``commit`` ends, so a directory without
``model.safetensors.index.json`` is not a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from babai_ao.errors import BabaiError

INDEX_FILE = "model.safetensors.index.json"


def shard_name(index: int, total: int) -> str:
    """``model-00003-of-00031.safetensors`` (``index`` from 0)."""
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def _save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


class ShardWriter:
    """Writes a model of ``blocks`` blocks shard by shard into ``directory``."""

    def __init__(self, directory: str | os.PathLike, blocks: int) -> None:
        self.directory = Path(directory)
        self.blocks = blocks
        self.total = blocks + 1  # one shard per block, then the rest
        self.directory.mkdir(parents=True, exist_ok=True)

    def write_block(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        """Block ``index``'s state dict (qualified names) as its own shard."""
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

        from babai_ao.ao import config as _config  # noqa: F401  (registers babai-ao's classes)
        from babai_ao.ao.integrity import add_digests

        data, metadata = flatten_tensor_state_dict(tensors)
        add_digests(tensors, metadata)
        metadata["format"] = "pt"
        _save(data, metadata, self.directory / shard_name(index, self.total))

    def commit(self, model: nn.Module, source: Any, out: str | os.PathLike,
               config: Any, blocks_path: str) -> None:
        """Write the last shard (``model``'s parameters outside ``blocks_path``, read from
        ``source``), the index and ``config.json`` into ``out``; the block shards are linked
        (or copied) there from ``directory`` if it is another directory, which keeps them,
        so a failure before ``out`` is complete loses no finished block."""
        from safetensors import safe_open
        from transformers import TorchAoConfig

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        metadata: dict[str, str] = {}
        weight_map: dict[str, str] = {}
        total_size = 0
        for b in range(self.blocks):
            name = shard_name(b, self.total)
            if not (self.directory / name).exists():
                raise BabaiError(f"block {b}'s shard {self.directory / name} is missing: the "
                                 "run did not finish that block; run it again (or resume)")
            if self.directory != out:  # linked (or copied): a failure later keeps the state whole
                _link_or_copy(self.directory / name, out / name)
            with safe_open(out / name, framework="pt") as h:
                meta = dict(h.metadata() or {})
                for key in h.keys():  # noqa: SIM118
                    weight_map[key] = name
                    sl = h.get_slice(key)
                    total_size += _nbytes(sl.get_shape(), sl.get_dtype())
            meta.pop("tensor_names", None)
            meta.pop("format", None)
            metadata.update(meta)
        state = model.state_dict(keep_vars=True)
        rest: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for key, value in state.items():
            if key.startswith(f"{blocks_path}."):
                continue
            metadata[key] = json.dumps({"_type": torch.Tensor.__name__})
            if id(value) in seen:  # a tied duplicate (lm_head = embedding): stored once
                continue
            seen.add(id(value))
            rest[key] = source.read(key).to(torch.float32) if value.is_meta else value.detach()
        names = list(state)
        metadata["tensor_names"] = json.dumps(names)
        metadata["format"] = "pt"
        last = shard_name(self.blocks, self.total)
        _save(rest, metadata, out / last)
        for key, value in rest.items():
            weight_map[key] = last
            total_size += value.numel() * value.element_size()
        hf_config = model.config
        hf_config.quantization_config = TorchAoConfig(quant_type=config)
        hf_config.save_pretrained(out)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(out)
        index = {"metadata": {"total_size": total_size},
                 "weight_map": dict(sorted(weight_map.items()))}
        tmp = out / f".{INDEX_FILE}.tmp"
        tmp.write_text(json.dumps(index, indent=2))
        os.replace(tmp, out / INDEX_FILE)


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copyfile(src, dst)


def _nbytes(shape: list[int], dtype: str) -> int:
    sizes = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
             "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}
    n = 1
    for s in shape:
        n *= s
    return n * sizes.get(dtype, 1)


def stored_bits_per_weight(directory: str | os.PathLike) -> float | None:
    """Average stored bits per weight of the quantized tensors of a saved checkpoint: the
    bytes of each one's stored tensors (codes, scales, zeros, outliers) over its elements."""
    from safetensors import safe_open

    files = sorted(Path(directory).glob("*.safetensors"))
    metadata: dict[str, str] = {}
    sizes: dict[str, int] = {}
    for f in files:
        with safe_open(f, framework="pt") as h:
            metadata.update(h.metadata() or {})
            for key in h.keys():  # noqa: SIM118
                sl = h.get_slice(key)
                sizes[key] = _nbytes(sl.get_shape(), sl.get_dtype())
    bits, count = 0, 0
    for name in json.loads(metadata.get("tensor_names", "[]")):
        entry = json.loads(metadata.get(name, "{}"))
        if entry.get("_type") in (None, torch.Tensor.__name__):
            continue
        module, attr = name.rsplit(".", 1)
        prefix = f"{module}._{attr}_"
        shape = entry["_data"]["shape"]
        bits += 8 * sum(v for k, v in sizes.items() if k.startswith(prefix))
        count += int(torch.Size(shape).numel())
    return bits / count if count else None
