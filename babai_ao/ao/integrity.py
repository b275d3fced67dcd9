"""Checkpoint integrity for babai-ao's tensor subclasses: a digest written at save, checked at load.

**What is hashed** (:func:`digest`): SHA-256 over, in this order, the class name; the JSON
(sorted keys) of every attribute torchao writes for the tensor (``tensor_attribute_names`` +
``optional_tensor_attribute_names``: bits, group size, shape, dtype, transposed, certificate,
Huffman chunk/max_len; dtypes as strings, tuples as lists); then, for each data tensor in the
class's fixed order (``tensor_data_names`` + ``optional_tensor_data_names``: codes, scales,
zeros, SSQR outliers, or the Huffman stream and its scale), its name, dtype, shape and bytes
in C order (an absent optional tensor as its name and ``none``). Device and strides do not
count, so a weight hashes the same on any device and as any view.

**Where it is stored**: ``"digest": "sha256:<hex>"``, computed from the bytes being written
and only then — in the tensor's JSON entry of the safetensors metadata (:func:`add_digests`,
run right after torchao flattens the state dict; ``integration`` hooks it into transformers'
torchao saving) and in the ``torch.save`` pickle (``__getstate__``). It is never kept on a
tensor in memory, so tensor ops (``.t()``, ``.to``, slices, ``detach``, ``clone``) and
``torch.compile`` neither compute nor carry it, and no digest can go stale.

**Where it is verified**: whenever a tensor is rebuilt from a checkpoint — torchao's
``unflatten_tensor_state_dict`` (``from_pretrained``, through transformers as well) builds it
with :func:`checkpoint_constructor`'s function (registered in torchao's ``ALLOWED_CLASSES``),
which checks the digest before the constructor runs; ``torch.load`` checks in
``__setstate__`` (:func:`install`). A mismatch raises ``BabaiError``: the bytes are damaged.
A tensor saved without a digest (checkpoints written before it existed, or flattened by
torchao directly) loads after cheap structural checks of its values instead (the class's
``_check_stored_values``: finite positive scales, a valid CSR index, a consistent Huffman
codebook and chunk index), which catch some damage but not every flipped code.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch._subclasses.fake_tensor import is_fake

from babai_ao.errors import BabaiError

DIGEST_KEY = "digest"
ALGORITHM = "sha256"
FIX = "the checkpoint's bytes are damaged; save the model again or re-download it"

_CLASSES: dict[str, type] = {}  # classes set up by install(), by name
_PENDING: contextvars.ContextVar[list[tuple[torch.Tensor, str | None]] | None] = \
    contextvars.ContextVar("babai_ao_pending_digests", default=None)


def data_names(cls: type) -> list[str]:
    """The data tensors of ``cls`` in hashing order (required, then optional)."""
    return [*cls.tensor_data_names, *getattr(cls, "optional_tensor_data_names", [])]


def attribute_names(cls: type) -> list[str]:
    """The non-tensor attributes torchao serializes for ``cls``."""
    return [*cls.tensor_attribute_names, *getattr(cls, "optional_tensor_attribute_names", [])]


def _canonical(value: Any) -> Any:
    """A JSON-able form that is the same before saving and after loading."""
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, (tuple, list)):  # torch.Size and JSON lists alike
        return [_canonical(v) for v in value]
    return value


def _concrete(t: torch.Tensor) -> bool:
    return not (is_fake(t) or t.is_meta)


def digest(cls: type, values: Mapping[str, Any]) -> str | None:
    """``sha256:<hex>`` of a ``cls`` tensor given by its data tensors and attributes
    (``values``, by name; see the module docstring). ``None`` for fake or meta data."""
    tensors = {n: values.get(n) for n in data_names(cls)}
    if not all(t is None or (isinstance(t, torch.Tensor) and _concrete(t))
               for t in tensors.values()):
        return None
    h = hashlib.sha256(cls.__name__.encode())
    attrs = {n: _canonical(values.get(n)) for n in attribute_names(cls)}
    h.update(json.dumps(attrs, sort_keys=True, default=repr).encode())
    for name, t in tensors.items():
        if t is None:
            h.update(f"\0{name}:none".encode())
            continue
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"\0{name}:{t.dtype}:{list(values[name].shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().data)
    return f"{ALGORITHM}:{h.hexdigest()}"


def digest_of(t: torch.Tensor) -> str | None:
    """:func:`digest` of a tensor object (its current bytes)."""
    cls = type(t)
    return digest(cls, {n: getattr(t, n) for n in (*data_names(cls), *attribute_names(cls))})


def _subject(cls: type, shape: Any, name: str | None) -> str:
    if name:
        return name
    try:
        dims = "×".join(str(int(s)) for s in shape)
    except (TypeError, ValueError):
        dims = "?"
    return f"a {dims} {cls.__name__}"


def check_digest(cls: type, values: Mapping[str, Any], stored: Any,
                 name: str | None = None) -> None:
    """Raise ``BabaiError`` unless ``stored`` is the digest of ``values`` (a ``cls`` tensor)."""
    if not isinstance(stored, str) or digest(cls, values) != stored:
        raise BabaiError(f"{_subject(cls, values.get('shape'), name)}: the stored data does not "
                         f"match its metadata ({ALGORITHM} digest): {FIX}")


def check_structure(t: torch.Tensor, name: str | None = None) -> None:
    """The class's cheap value checks (``_check_stored_values``), for tensors with no digest."""
    if not all(_concrete(getattr(t, n)) for n in data_names(type(t))
               if getattr(t, n, None) is not None):
        return
    problem = t._check_stored_values()  # type: ignore[attr-defined]
    if problem:
        raise BabaiError(f"{_subject(type(t), t.shape, name)} has {problem} (it has no digest "
                         f"to check): {FIX}")


def verify_loaded(t: torch.Tensor, stored: Any, name: str | None = None) -> None:
    """Check a tensor rebuilt from a checkpoint: its digest if one was stored, else its values."""
    if stored is None:
        check_structure(t, name)
    else:
        cls = type(t)
        check_digest(cls, {n: getattr(t, n) for n in (*data_names(cls), *attribute_names(cls))},
                     stored, name)


def rebuild(cls: type, kwargs: dict[str, Any], name: str | None = None) -> torch.Tensor:
    """``cls(**kwargs)`` from a checkpoint entry, digest checked first (the constructor's own
    checks would give a vaguer error for the same damage)."""
    kwargs = dict(kwargs)
    stored = kwargs.pop(DIGEST_KEY, None)
    if stored is not None:
        check_digest(cls, kwargs, stored, name)
    out = cls(**kwargs)
    if stored is None:
        check_structure(out, name)
    return out


def checkpoint_constructor(cls: type) -> Any:
    """What torchao's ``object_from_dict`` should call for ``cls``: :func:`rebuild`."""

    def build(**kwargs: Any) -> torch.Tensor:
        return rebuild(cls, kwargs)

    build.__name__ = build.__qualname__ = cls.__name__  # torchao names it in its errors
    build.__doc__ = f"Rebuild a {cls.__name__} from a checkpoint, its digest checked."
    return build


def rebuild_entry(entry: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                  name: str) -> torch.Tensor | None:
    """Rebuild one torchao safetensors metadata ``entry`` (decoded JSON) of a babai-ao tensor
    from its data ``tensors`` (by suffix), checked, ``BabaiError`` naming ``name``; ``None``
    for other types."""
    from torchao.prototype.safetensors.safetensors_utils import object_from_dict

    cls = _CLASSES.get(entry.get("_type", ""))
    if cls is None:
        return None
    kwargs = {k: object_from_dict(v) if isinstance(v, dict) and "_type" in v else v
              for k, v in entry.get("_data", {}).items()}
    return rebuild(cls, {**kwargs, **tensors}, name)


def add_digests(tensors: Mapping[str, Any], metadata: dict[str, str]) -> dict[str, str]:
    """Add each babai-ao tensor's digest to its entry in torchao's flattened ``metadata``.

    ``tensors`` is the state dict that was flattened (``name -> tensor``); entries of other
    types are left alone. Returns ``metadata`` (changed in place).
    """
    for name, t in tensors.items():
        if type(t).__name__ not in _CLASSES or name not in metadata:
            continue
        d = digest_of(t)
        if d is None:
            continue
        entry = json.loads(metadata[name])
        entry["_data"][DIGEST_KEY] = d
        metadata[name] = json.dumps(entry)
    return metadata


@contextlib.contextmanager
def deferred() -> Iterator[list[tuple[torch.Tensor, str | None]]]:
    """Within it, ``torch.load`` collects ``(tensor, stored digest)`` instead of checking, so
    the caller can check each under its state-dict key (:func:`verify_loaded`)."""
    pending: list[tuple[torch.Tensor, str | None]] = []
    token = _PENDING.set(pending)
    try:
        yield pending
    finally:
        _PENDING.reset(token)


def install(cls: type) -> type:
    """Give ``cls`` (a ``TorchAOBaseTensor`` subclass) a digest in its ``torch.save`` pickle and
    a check of it on ``torch.load``. Run after the class statement: torchao's
    ``__init_subclass__`` sets ``__setstate__`` when the class is created."""
    base_setstate = cls.__setstate__

    def __getstate__(self: torch.Tensor) -> dict[str, Any]:
        state = dict(self.__dict__)
        d = digest_of(self)
        if d is not None:
            state[DIGEST_KEY] = d
        return state

    def __setstate__(self: torch.Tensor, state: Any) -> None:
        stored = None
        if isinstance(state, dict) and DIGEST_KEY in state:
            state = dict(state)
            stored = state.pop(DIGEST_KEY)
        base_setstate(self, state)
        pending = _PENDING.get()
        if pending is not None:
            pending.append((self, stored))
        else:
            verify_loaded(self, stored)

    cls.__getstate__ = __getstate__  # type: ignore[method-assign]
    cls.__setstate__ = __setstate__  # type: ignore[method-assign]
    _CLASSES[cls.__name__] = cls
    return cls


def bad_scales(scale: torch.Tensor) -> bool:
    """Scales that no babai-ao format stores: not finite or not positive."""
    s = scale.detach().float()
    return not bool(torch.isfinite(s).all()) or bool((s <= 0).any())
