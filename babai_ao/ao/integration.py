"""Registration of babai-ao's config and tensor with torchao's and transformers' allow-lists.

torchao 0.18 rebuilds objects from JSON only from allow-lists, and transformers 5's torchao
loader collects only known tensor-name suffixes. ``register()`` (idempotent; run when
``babai_ao.ao.config`` is imported, so ``import babai_ao.ao.config`` before ``from_pretrained`` in
a fresh process is all a user needs) adds:

1. ``"babai_ao.ao.config"`` to ``torchao.core.config.ALLOWED_AO_MODULES``, so
   ``config_from_dict`` (used by ``TorchAoConfig.from_dict`` when transformers reads a saved
   ``config.json``) finds ``BabaiConfig``;
2. ``BabaiQuantizedTensor`` to ``torchao.prototype.safetensors``'s
   ``ALLOWED_TENSORS_SUBCLASSES`` / ``ALLOWED_CLASSES``, so ``flatten_tensor_state_dict`` /
   ``unflatten_tensor_state_dict`` (what ``save_pretrained(safe_serialization=True)`` and
   ``from_pretrained`` call) store it as its plain tensors plus JSON attributes;
3. the SSQR outlier suffixes (``_weight_outlier_ptr`` …) and HPTQ's Huffman-stream
   suffixes (``_weight_bitstream`` …; ``HuffmanQuantizedTensor`` is registered as in 2) to
   ``TorchAoHfQuantizer``'s ``serialized_names``. ``qdata``/``scale``/``zero_point`` are already on transformers'
   list; without this, checkpoints with outliers would drop those tensors at load. It wraps
   the property (the only hook transformers offers), adding names and removing none;
4. checkpoint digests (``integrity``): torchao rebuilds both classes through
   ``integrity.checkpoint_constructor`` (the ``ALLOWED_CLASSES`` entry), which checks the
   stored digest, and ``TorchAoHfQuantizer.get_state_dict_and_metadata`` (what
   ``save_pretrained`` calls to flatten the model) is wrapped to add the digests to the
   metadata (``integrity.add_digests``) — so plain ``model.save_pretrained`` /
   ``AutoModelForCausalLM.from_pretrained`` write and check them too.
"""

from __future__ import annotations

import importlib.util

CONFIG_MODULE = "babai_ao.ao.config"
OUTLIER_NAMES = ("outlier_ptr", "outlier_idx", "outlier_val",
                 # HPTQ's Huffman stream (babai_ao.ao.hptq_tensor)
                 "bitstream", "symbols", "lengths", "offsets", "header")
_done = False


def _register_transformers() -> None:
    if importlib.util.find_spec("transformers") is None:
        return
    from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer

    original = TorchAoHfQuantizer.serialized_names
    if not isinstance(original, property) or getattr(original.fget, "_babai_ao", False):
        return

    def serialized_names(self) -> dict[str, list[str]]:
        names = original.fget(self)
        return {param: [*suffixes, *(f"_{param}_{s}" for s in OUTLIER_NAMES
                                     if f"_{param}_{s}" not in suffixes)]
                for param, suffixes in names.items()}

    serialized_names._babai_ao = True  # type: ignore[attr-defined]
    TorchAoHfQuantizer.serialized_names = property(serialized_names)
    _register_experts(TorchAoHfQuantizer)
    _register_digests(TorchAoHfQuantizer)


def _register_digests(quantizer: type) -> None:
    """Wrap ``quantizer.get_state_dict_and_metadata`` to add babai-ao's digests."""
    from .integrity import add_digests

    original = getattr(quantizer, "get_state_dict_and_metadata", None)
    if original is None or getattr(original, "_babai_ao", False):
        return

    def get_state_dict_and_metadata(self, model, *args, **kwargs):  # type: ignore[no-untyped-def]
        state_dict, metadata = original(self, model, *args, **kwargs)
        return state_dict, add_digests(model.state_dict(), metadata)

    get_state_dict_and_metadata._babai_ao = True  # type: ignore[attr-defined]
    get_state_dict_and_metadata.__doc__ = original.__doc__
    quantizer.get_state_dict_and_metadata = get_state_dict_and_metadata


def _register_experts(quantizer: type) -> None:
    """Before weights load, rebuild quantized MoE experts (``BabaiExperts``) in the model, as
    its config.json's ``babai_experts`` entry says (``experts.install_empty``)."""
    from .experts import install_empty

    original = quantizer._process_model_before_weight_loading
    if getattr(original, "_babai_ao", False):
        return

    def process(self, model, *args, **kwargs):  # type: ignore[no-untyped-def]
        result = original(self, model, *args, **kwargs)
        install_empty(model)
        return result

    process._babai_ao = True  # type: ignore[attr-defined]
    quantizer._process_model_before_weight_loading = process


def register() -> None:
    """Add babai-ao to torchao's and transformers' allow-lists (see module docstring)."""
    global _done
    if _done:
        return
    from torchao.core import config as ao_config
    from torchao.prototype.safetensors import safetensors_utils

    from .hptq_tensor import HuffmanQuantizedTensor
    from .integrity import checkpoint_constructor
    from .tensor import BabaiQuantizedTensor

    ao_config.ALLOWED_AO_MODULES.add(CONFIG_MODULE)
    for cls in (BabaiQuantizedTensor, HuffmanQuantizedTensor):
        name = cls.__name__
        if name not in safetensors_utils.ALLOWED_TENSORS_SUBCLASSES:
            safetensors_utils.ALLOWED_TENSORS_SUBCLASSES.append(name)
        safetensors_utils.ALLOWED_CLASSES[name] = checkpoint_constructor(cls)
    _register_transformers()
    _done = True
