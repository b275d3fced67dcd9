"""Checkpoints of babai-quantized models: transformers (safetensors) and ``torch.save``.

A model quantized in place (``quantize_``, ``quantize_model``, observe/convert) is not yet
known to transformers as a torchao model, so its ``save_pretrained`` would hand the tensor
subclass to safetensors as is. ``save_pretrained(model, path, config)`` marks it the way
``from_pretrained(..., quantization_config=TorchAoConfig(...))`` would (a ``TorchAoConfig``
carrying the ``BabaiConfig`` and torchao's ``HfQuantizer``), then saves with safetensors:
each ``BabaiQuantizedTensor`` is written as its plain tensors (``<module>._weight_qdata``,
``_weight_scale``, ``_weight_zero_point``, outliers) plus JSON attributes in the header.

``from_pretrained(path)`` registers babai-ao with torchao/transformers (``babai_ao.ao.config``),
checks every ``*.safetensors`` file opens (a truncated or corrupt file raises
``BabaiError`` naming it) and loads with ``AutoModelForCausalLM``; mismatches between the
stored tensors and their metadata surface as ``BabaiError`` from the tensor's checks. Every
quantized tensor carries a SHA-256 digest of its stored bytes in the metadata
(``babai_ao.ao.integrity``), checked as torchao rebuilds it, so a checkpoint whose tensor
data were damaged fails to load; ``verify_checkpoint(path)`` checks a directory without
loading a model and names the damaged tensor.

Once ``babai_ao`` is imported, the plain Hugging Face calls work too: ``model.save_pretrained
(path)`` of a model holding babai-ao weights runs ``save_pretrained`` here (the config is
the one that quantized it in this process, or the one it was loaded with; otherwise it
stops before writing anything and says to pass it), and
``AutoModelForCausalLM.from_pretrained(path)`` finds ``BabaiConfig`` (``babai_ao/__init__.py``
wires both up when transformers and torchao are imported).

``load_state_dict(model, path)`` is ``torch.load`` + ``model.load_state_dict`` with the
failures (unreadable file, damaged tensor data — the digest pickled with each quantized
tensor —, wrong shape, other bits, other outlier layout) as ``BabaiError``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from babai_ao.errors import BabaiError


def _is_babai_weight(module: nn.Module) -> bool:
    from babai_ao.ao.hptq_tensor import HuffmanQuantizedTensor
    from babai_ao.ao.tensor import BabaiQuantizedTensor

    return isinstance(getattr(module, "weight", None),
                      (BabaiQuantizedTensor, HuffmanQuantizedTensor))


def save_pretrained(model: nn.Module, path: str | os.PathLike, config: Any = None,
                    *args: Any, **kwargs: Any) -> None:
    """Save a babai-quantized transformers model (safetensors) so ``from_pretrained`` loads it.

    ``config``: the ``BabaiConfig`` the model was quantized with; ``None`` takes the one that
    quantized it in this process (``quantize_model``, ``quantize_``), or the one it was
    loaded with. Extra arguments go to transformers' ``save_pretrained``. This is also what
    ``model.save_pretrained(path)`` runs for a model holding babai-ao weights once
    ``babai_ao`` is imported (``patch_save_pretrained``).
    """
    if kwargs.get("safe_serialization") is False:
        raise BabaiError("babai-ao checkpoints are saved with safetensors: drop "
                         "safe_serialization=False")
    _mark_quantized(model, config)
    _transformers_save(model, path, *args, **kwargs)
    for name in _tied_quantized_duplicates(model):
        _drop_from_checkpoint(Path(path), name)


def _mark_quantized(model: nn.Module, config: Any) -> None:
    """Check ``model`` and mark it as torchao-quantized for transformers, as
    ``from_pretrained(..., quantization_config=TorchAoConfig(...))`` would; all checks run
    before anything is written."""
    from transformers import TorchAoConfig
    from transformers.quantizers.auto import AutoHfQuantizer

    from babai_ao.ao.config import BabaiConfig, applied_config

    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise BabaiError(f"{type(model).__name__} is not a transformers model: save its "
                         "state_dict with torch.save instead")
    if not any(_is_babai_weight(m) for m in model.modules()):
        raise BabaiError("the model holds no babai-ao quantized weights (BabaiQuantizedTensor or "
                         "HuffmanQuantizedTensor): quantize it first")
    if config is None and getattr(model, "hf_quantizer", None) is not None:
        return  # loaded quantized (or marked before): transformers knows how to save it
    config = config if config is not None else applied_config(model)
    if config is None:
        raise BabaiError("this model's babai-ao weights were not quantized in this process, so "
                         "the BabaiConfig to write in config.json is unknown: save with "
                         "babai_ao.hf.save_pretrained(model, path, babai_ao.babai_config(...))")
    if not isinstance(config, BabaiConfig):
        raise BabaiError(f"config must be the BabaiConfig the model was quantized with, got "
                         f"{type(config).__name__}: save with babai_ao.hf.save_pretrained(model, "
                         "path, babai_ao.babai_config(...))")
    quantization_config = TorchAoConfig(quant_type=config)
    model.config.quantization_config = quantization_config
    model.hf_quantizer = AutoHfQuantizer.from_config(quantization_config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = quantization_config.quant_method


_ORIGINAL_SAVE: dict[type, Any] = {}


def _transformers_save(model: nn.Module, path: str | os.PathLike, *args: Any,
                       **kwargs: Any) -> None:
    """transformers' own ``save_pretrained`` (the one :func:`patch_save_pretrained` wrapped)."""
    cls = next((c for c in type(model).__mro__ if c in _ORIGINAL_SAVE), None)
    save = _ORIGINAL_SAVE[cls] if cls is not None else type(model).save_pretrained
    # A model loaded by from_pretrained keeps the weight conversions it was loaded with, to
    # undo them on save; torchao's tensor rebuild has no inverse (transformers raises
    # NotImplementedError) and needs none: the quantizer flattens the tensors again.
    loaded_with = getattr(model, "_weight_conversions", None)
    if loaded_with:
        model._weight_conversions = [c for c in loaded_with if _reversible(c)]
    try:
        save(model, path, *args, **kwargs)
    finally:
        if loaded_with:
            model._weight_conversions = loaded_with


def _reversible(conversion: Any) -> bool:
    try:
        conversion.reverse_transform()
    except NotImplementedError:
        return False
    return True


def patch_save_pretrained(pretrained_model: type) -> None:
    """Route ``model.save_pretrained(path)`` of models holding babai-ao weights through
    :func:`save_pretrained` (other models are untouched). Idempotent."""
    if pretrained_model in _ORIGINAL_SAVE:
        return
    original = pretrained_model.save_pretrained
    _ORIGINAL_SAVE[pretrained_model] = original

    @functools.wraps(original)
    def save(self: nn.Module, save_directory: str | os.PathLike, *args: Any,
             **kwargs: Any) -> Any:
        if not any(_is_babai_weight(m) for m in self.modules()):
            return original(self, save_directory, *args, **kwargs)
        return save_pretrained(self, save_directory, None, *args, **kwargs)

    pretrained_model.save_pretrained = save


def _tied_quantized_duplicates(model: nn.Module) -> list[str]:
    """Tied parameter names (``lm_head.weight``) whose quantized weight is the same tensor as
    their source: transformers drops tied duplicates by name, but torchao's flattening
    renames them (``lm_head._weight_qdata``), so the table would be written twice."""
    from babai_ao.ao.tensor import BabaiQuantizedTensor

    if not getattr(model.config, "tie_word_embeddings", False):
        return []
    tied = getattr(model, "_tied_weights_keys", None) or {}
    params = dict(model.named_parameters(remove_duplicate=False))
    return [dst for dst, src in (tied.items() if isinstance(tied, dict) else [])
            if dst in params and params[dst] is params.get(src)
            and isinstance(params[dst].detach(), BabaiQuantizedTensor)]


def _drop_from_checkpoint(path: Path, name: str) -> None:
    """Remove parameter ``name``'s flattened tensors and metadata from the saved files (it is
    re-tied on load)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    prefix = name.rsplit(".", 1)[0] + "._" + name.rsplit(".", 1)[1] + "_"
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            keys = list(h.keys())  # noqa: SIM118
            if not any(k.startswith(prefix) for k in keys):
                continue
            meta = dict(h.metadata() or {})
            tensors = {k: h.get_tensor(k) for k in keys if not k.startswith(prefix)}
        meta.pop(name, None)
        if "tensor_names" in meta:
            meta["tensor_names"] = json.dumps([n for n in json.loads(meta["tensor_names"])
                                               if n != name])
        save_file(tensors, f, metadata=meta)
    index = path / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: v for k, v in data.get("weight_map", {}).items()
                              if not k.startswith(prefix) and k != name}
        index.write_text(json.dumps(data, indent=2))


def check_checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """Every ``*.safetensors`` file under ``path``, each opened once (``BabaiError`` if bad)."""
    from safetensors import SafetensorError, safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise BabaiError(f"{path} holds no .safetensors file: save with "
                         "babai_ao.checkpoints.hf.save_pretrained(model, path, config)")
    for f in files:
        try:
            with safe_open(f, framework="pt") as h:
                for key in h.keys():  # noqa: SIM118  (safe_open handles have no __iter__)
                    h.get_slice(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise BabaiError(f"checkpoint file {f} is truncated or corrupt ({e}): save the "
                             "model again") from None
    return files


_DAMAGED = "the checkpoint's bytes are damaged; save the model again or re-download it"


def verify_checkpoint(path: str | os.PathLike) -> int:
    """Rebuild every babai-ao tensor stored in ``path``'s safetensors files and check it: its
    digest (``babai_ao.ao.integrity``), or for checkpoints written without one its values.

    Raises ``BabaiError`` naming the first damaged tensor and its file; returns how many
    tensors were checked. ``from_pretrained`` runs it when a load fails, to say which tensor.
    """
    import contextlib
    import json

    from safetensors import safe_open

    from babai_ao.ao import config as _config  # noqa: F401  (registers babai-ao's classes)
    from babai_ao.ao.integrity import rebuild_entry

    files = check_checkpoint_files(path)
    metadata: dict[str, str] = {}
    where: dict[str, Path] = {}
    checked = 0
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(f, framework="pt")) for f in files}
        for f, h in handles.items():
            metadata.update(h.metadata() or {})
            where.update({k: f for k in h.keys()})  # noqa: SIM118
        try:
            names = json.loads(metadata.get("tensor_names", "[]"))
        except ValueError:
            names = []
        for name in names:
            try:
                entry = json.loads(metadata.get(name, "{}"))
            except ValueError:
                raise BabaiError(f"the metadata of {name} in {path} is not JSON: "
                                 f"{_DAMAGED}") from None
            module, attr = name.rsplit(".", 1)
            prefix = f"{module}._{attr}_"
            keys = [k for k in where if k.startswith(prefix)]
            tensors = {k[len(prefix):]: handles[where[k]].get_tensor(k) for k in keys}
            label = f"{name} ({', '.join(sorted({where[k].name for k in keys}))})"
            if rebuild_entry(entry, tensors, label) is not None:
                checked += 1
    return checked


def _name_the_damage(path: str | os.PathLike) -> None:
    """After a failed load: re-check the checkpoint tensor by tensor, so the error names the
    damaged one (``BabaiError``); returns quietly when nothing is found."""
    try:
        verify_checkpoint(path)
    except BabaiError:
        raise
    except (ValueError, KeyError, RuntimeError, OSError, TypeError):
        pass  # not what this looks for: the caller reports the original failure


def from_pretrained(path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """Load a model saved by :func:`save_pretrained` (``AutoModelForCausalLM``).

    Each quantized tensor's digest is checked as torchao rebuilds it; on any failure the
    checkpoint is re-checked tensor by tensor (:func:`verify_checkpoint`) so the
    ``BabaiError`` names the damaged tensor.
    """
    from transformers import AutoModelForCausalLM

    from babai_ao.ao import config as _config  # noqa: F401  (registers babai-ao's classes)

    check_checkpoint_files(path)
    want_info = kwargs.pop("output_loading_info", False)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True,
                                                           **kwargs)
    except BabaiError:
        _name_the_damage(path)
        raise
    except (ValueError, KeyError, RuntimeError) as e:
        _name_the_damage(path)
        raise BabaiError(f"could not load the babai-ao checkpoint {path}: {e}. The file does "
                         "not match its metadata; save the model again") from e
    # transformers logs a failed tensor rebuild and leaves the weight freshly initialized
    problems = {k: info.get(k) for k in ("conversion_errors", "error_msgs", "missing_keys",
                                         "mismatched_keys") if info.get(k)}
    if problems:
        _name_the_damage(path)
        raise BabaiError(f"the checkpoint {path} did not load cleanly: {problems}. Its tensors "
                         "do not match their metadata or the model; save the model again")
    return (model, info) if want_info else model


def load_state_dict(model: nn.Module, checkpoint: str | os.PathLike | dict, *,
                    assign: bool = False) -> nn.Module:
    """Load a ``torch.save``'d state dict (path or dict) into ``model``; errors as BabaiError.

    ``assign=True`` installs the stored tensors as they are (a float model becomes
    quantized); ``assign=False`` copies into a model quantized with the same config. Each
    quantized tensor read from a file is checked against the digest pickled with it (or,
    pickled before digests existed, its values), the error naming its key.
    """
    from babai_ao.ao import tensor as _tensor  # noqa: F401  (allow-lists the subclass for weights_only)
    from babai_ao.ao.integrity import deferred, verify_loaded

    if isinstance(checkpoint, dict):
        state = checkpoint
    else:
        try:
            with deferred() as pending:
                state = torch.load(checkpoint, weights_only=True, map_location="cpu")
        except (RuntimeError, OSError, EOFError, ValueError) as e:
            raise BabaiError(f"cannot read checkpoint {checkpoint} ({e}): the file is "
                             "truncated or not a torch.save state dict; save it again") from None
        keys = {id(v): k for k, v in state.items()} if isinstance(state, dict) else {}
        for t, stored in pending:
            key = keys.get(id(t))
            verify_loaded(t, stored, f"{key} in {checkpoint}" if key else None)
    try:
        model.load_state_dict(state, assign=assign)
    except RuntimeError as e:
        raise BabaiError(f"the checkpoint does not fit this model: {e}") from None
    return model
