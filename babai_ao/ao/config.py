"""``BabaiConfig``: the torchao config behind ``quantize_(model, babai_config(...))``.

Three uses of one config, picked by ``step``:

* ``step=None``: each ``nn.Linear`` weight becomes a ``BabaiQuantizedTensor`` quantized with
  ``H = I`` — exactly round-to-nearest on the same grid — with one warning that no Hessian
  was observed (calibrate with ``babai_ao.quantize_model`` or the two steps below);
* ``step="observe"``: each linear gets an observer (``babai_ao.ao.observe``) accumulating
  ``H = Σ XᵀX`` of its inputs while the user runs data through the model;
* ``step="convert"``: each observed linear is quantized by Babai's nearest plane against its
  ``H`` (``quantize_weight``), the certificate kept on the tensor.

``clip``: ``True`` clamps codes to the b-bit range; ``False`` does not (then codes that leave
the range cannot be packed and conversion raises); ``"ssqr"`` stores them as a sparse CSR
correction (``babai_ao.formats.ssqr``, with ``target_bits`` or ``outlier_density``); ``"hptq"`` is
the Huffman format (``babai_ao.formats.hptq``, needs ``target_bits``; one step per tensor, ``bits``
and ``group_size`` unused): the weight becomes a ``HuffmanQuantizedTensor`` holding the
bitstream, decoded for compute by ``babai_ao.ao.hptq_tensor.decode_model``.

Importing this module registers babai-ao with torchao's and transformers' allow-lists
(``babai_ao.ao.integration``), so ``TorchAoConfig(quant_type=babai_config(...))`` checkpoints
load back with ``from_pretrained`` after ``import babai_ao.ao.config``.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler

from babai_ao.errors import BabaiError
from babai_ao.lattice.grid import SUPPORTED_BITS
from babai_ao.lattice.ldl import ORDERS
from babai_ao.lattice.quantize import SEARCHES, quantize_weight

from . import integration, observe
from .tensor import BabaiQuantizedTensor

STEPS = (None, "observe", "convert")
CLIPS = (True, False, "ssqr", "hptq")
NO_HESSIAN_WARNING = ("babai_config without calibration: no Hessian was observed, so the "
                      "weights are rounded to nearest (H = I). For Babai/GPTQ quality run "
                      "babai_ao.quantize_model(model, config, calibration), or "
                      "quantize_(model, babai_config(step='observe')), run data, then "
                      "quantize_(model, babai_config(step='convert')).")


@dataclass
class BabaiConfig(AOBaseConfig):
    """Weight-only b-bit group quantization by Babai's nearest plane (see module docstring)."""

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    order: str = "act"
    clip: bool | str = True
    damp: float = 0.01
    step: str | None = None
    target_bits: float | None = None
    outlier_density: float | None = None
    block_size: int = 128
    refine: int = 0
    exact_offset: bool = False
    search: str = "babai"
    k: int = 16

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS or isinstance(self.bits, bool):
            raise BabaiError(f"bits={self.bits!r} is not supported: choose one of "
                             f"{SUPPORTED_BITS}")
        if self.group_size == -1:
            self.group_size = None
        if self.group_size is not None and (
                isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                or self.group_size <= 0):
            raise BabaiError(f"group_size={self.group_size!r} must be a positive integer "
                             "dividing in_features (e.g. 64, 128) or None for one group per row")
        if not isinstance(self.symmetric, bool):
            raise BabaiError(f"symmetric={self.symmetric!r} must be True or False")
        if self.order not in ORDERS:
            raise BabaiError(f"order={self.order!r} is unknown: choose one of {ORDERS}")
        if not any(self.clip is c if isinstance(c, bool) else self.clip == c for c in CLIPS):
            raise BabaiError(f"clip={self.clip!r} is not supported: choose True (clamp), False "
                             "(no clamping), 'ssqr' (sparse outliers) or 'hptq' (Huffman)")
        if not isinstance(self.damp, (int, float)) or isinstance(self.damp, bool) \
                or not self.damp >= 0:
            raise BabaiError(f"damp={self.damp!r} must be a number >= 0 (default 0.01)")
        if self.step not in STEPS:
            raise BabaiError(f"step={self.step!r} is unknown: use None (no calibration), "
                             "'observe' (attach Hessian observers) or 'convert'")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) \
                or self.block_size <= 0:
            raise BabaiError(f"block_size={self.block_size!r} must be a positive integer")
        if isinstance(self.refine, bool) or not isinstance(self.refine, int) or self.refine < 0:
            raise BabaiError(f"refine={self.refine!r} must be an integer >= 0 (coordinate-"
                             "descent sweeps after Babai; 0 = plain Babai/GPTQ)")
        if self.refine and self.clip in ("ssqr", "hptq"):
            raise BabaiError("refine applies to the fixed grids (clip=True/False); the "
                             "ssqr/hptq rate searches run plain Babai: set refine=0")
        if self.clip not in ("ssqr", "hptq") and (
                self.target_bits is not None or self.outlier_density is not None):
            raise BabaiError("target_bits / outlier_density apply to the no-clipping formats: "
                             "set clip='ssqr' (or 'hptq' for target_bits)")
        if self.clip == "hptq" and (self.target_bits is None or self.outlier_density is not None):
            raise BabaiError("clip='hptq' (Huffman-coded) is rate-targeted: give "
                             "target_bits (e.g. 3.3) and no outlier_density")
        if self.target_bits is not None and self.outlier_density is not None:
            raise BabaiError("give target_bits or outlier_density, not both")
        if self.clip == "ssqr" and self.symmetric:
            raise BabaiError("clip='ssqr' uses asymmetric shrunk grids: set symmetric=False")
        if self.search not in SEARCHES:
            raise BabaiError(f"search={self.search!r} is unknown: choose one of {SEARCHES}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise BabaiError(f"k={self.k!r} must be an integer >= 1 (K-best survivors per row)")
        if self.search == "kbest" and self.clip == "ssqr":
            raise BabaiError("search='kbest' runs on fixed grids and HPTQ; SSQR's outlier "
                             "search is Babai's: use clip=True/False/'hptq' or search='babai'")
        if self.search == "kbest" and self.order == "natural" and self.clip != "hptq" \
                and self.group_size is not None:
            raise BabaiError("search='kbest' needs grids fixed up front: use order='act' or "
                             "'min-pivot'")
        if not isinstance(self.exact_offset, bool):
            raise BabaiError(f"exact_offset={self.exact_offset!r} must be True or False")
        if self.exact_offset and self.clip in ("ssqr", "hptq"):
            raise BabaiError("exact_offset applies to the fixed grids (clip=True/False, for "
                             "GGUF Q4_1): set exact_offset=False with ssqr/hptq")

    def applied_to(self, module: nn.Module) -> None:
        """Remember that ``module``'s weight was quantized with this config (for
        ``model.save_pretrained``, which must write the config: ``applied_config``)."""
        _APPLIED[module] = self

    def quantize_tensor(self, weight: torch.Tensor, hessian: torch.Tensor | None = None,
                        dtype: torch.dtype | None = None) -> BabaiQuantizedTensor:
        """One weight [N, K] quantized against ``hessian`` (``None``: ``H = I``) as a tensor.

        The single place where the config's format choice (``clip``) is applied; the
        sequential calibration and the torchao handler both call it.
        """
        dtype = dtype or weight.dtype
        if self.clip == "hptq":
            from babai_ao.formats import hptq

            from .hptq_tensor import HuffmanQuantizedTensor

            hw = hptq.quantize(weight.detach(), hessian, self.target_bits, order=self.order,
                               damp=self.damp, search=self.search, k=self.k)
            return HuffmanQuantizedTensor.from_hptq(hw, dtype)  # type: ignore[return-value]
        if self.clip == "ssqr":
            from babai_ao.formats import ssqr

            kwargs: dict[str, Any] = {}
            if self.target_bits is None and self.outlier_density is None:
                kwargs["multiplier"] = 1.0
            sw = ssqr.quantize(weight.detach(), hessian, bits=self.bits,
                               group_size=self.group_size, target_bits=self.target_bits,
                               outlier_density=self.outlier_density, order=self.order,
                               damp=self.damp, **kwargs)
            return BabaiQuantizedTensor.from_quantized(sw, dtype)
        qw = quantize_weight(weight.detach(), hessian, bits=self.bits,
                             group_size=self.group_size, symmetric=self.symmetric,
                             order=self.order, clip=bool(self.clip), damp=self.damp,
                             block_size=self.block_size, refine=self.refine,
                             exact_offset=self.exact_offset, search=self.search, k=self.k)
        return BabaiQuantizedTensor.from_quantized(qw, dtype)


def babai_config(bits: int = 4, group_size: int | None = 128, symmetric: bool = False,
                 order: str = "act", clip: bool | str = True, damp: float = 0.01,
                 step: str | None = None, target_bits: float | None = None,
                 outlier_density: float | None = None, block_size: int = 128,
                 refine: int = 0, exact_offset: bool = False, search: str = "babai",
                 k: int = 16) -> BabaiConfig:
    """The config for ``torchao.quantization.quantize_`` (arguments validated; BabaiError).

    ``search="kbest"``: K-best back-substitution with ``k`` survivors per row instead of
    Babai's single path (``babai_ao.lattice.kbest``; never a larger error than Babai).

    ``exact_offset=True``: asymmetric grids whose offset ``s·z`` is exact in fp16, so GGUF
    Q4_1 (``w = d·q + m``, fp16 ``m = −s·z``) stores them exactly (``babai_ao.lattice.grid``).
    """
    return BabaiConfig(bits=bits, group_size=group_size, symmetric=symmetric, order=order,
                       clip=clip, damp=damp, step=step, target_bits=target_bits,
                       outlier_density=outlier_density, block_size=block_size,
                       refine=refine, exact_offset=exact_offset, search=search, k=k)


_APPLIED: weakref.WeakKeyDictionary[nn.Module, BabaiConfig] = weakref.WeakKeyDictionary()


def applied_config(model: nn.Module) -> BabaiConfig | None:
    """The ``BabaiConfig`` that quantized a linear of ``model`` in this process, if any."""
    return next((_APPLIED[m] for m in model.modules() if m in _APPLIED), None)


@register_quantize_module_handler(BabaiConfig)
def _babai_transform(module: nn.Module, config: BabaiConfig, *,
                     parameter_name: str = "weight") -> nn.Module:
    if not isinstance(module, nn.Linear) or parameter_name != "weight":
        raise BabaiError(f"babai_config quantizes nn.Linear weights, got "
                         f"{type(module).__name__}.{parameter_name}: pass a filter_fn that "
                         "selects linears (the default)")
    if config.step == "observe":
        observe.observe(module)
        return module
    weight = module.weight.detach()
    if isinstance(weight, BabaiQuantizedTensor):
        raise BabaiError("this linear is already quantized: quantize_ the float model (load "
                         "it again) instead of quantizing twice")
    hessian = None
    if config.step == "convert":
        acc = observe.stop_observing(module)
        if acc.tokens == 0:
            raise BabaiError("an observed linear saw no data: run calibration batches "
                             "through the model between step='observe' and step='convert'")
        hessian = acc.hessian
    elif not getattr(config, "_warned_no_hessian", False):
        warnings.warn(NO_HESSIAN_WARNING, UserWarning, stacklevel=4)
        config._warned_no_hessian = True  # once per config (not a field: not serialized)
    module.weight = nn.Parameter(config.quantize_tensor(weight, hessian, weight.dtype),
                                 requires_grad=False)
    config.applied_to(module)
    return module


integration.register()
