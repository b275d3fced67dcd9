"""``HuffmanQuantizedTensor``: an HPTQ weight as stored — Huffman stream plus scale(s).

Its data tensors are exactly ``hptq.HPTQWeight.tensors()`` (``bitstream``, ``symbols``,
``lengths``, ``offsets``, ``header`` of ``babai_ao.formats.huffman``, and ``scale``), so safetensors
checkpoints carry the bitstream and the stored bytes are the accounted bytes. Compute needs
the decoded form: ``decode()`` gives the ``BabaiQuantizedTensor`` of ``hptq.compute_form``
(8-bit codes + 128, zero 128, one group per row, CSR for codes past int8), and
``decode_model(model)`` swaps every Huffman weight of a loaded model for it — the "loading
decodes" step (chunk-parallel: the Triton decode kernel on CUDA, a vectorized NumPy loop on
CPU). A linear called on the stored form is ``babai::hptq_linear``: on CUDA a Triton kernel
that decodes the stream inside the matmul, so the weight stays entropy-coded in memory; on
CPU, by default, one C++ kernel on each group's 16-code window as nibbles (and a second
nibble row for the rows with the most codes off it) plus a sparse correction for the rest
(``babai_ao.kernels.cpu_hptq``: the same weight exactly, fp32 sums, built on first use),
from a layout built on the first call (or when ``torch.compile`` first sees the weight) and
kept on the tensor, never saved (``cpu_layout``); where that layout does not fit, under
``babai_ao.cpu_kernel("exact")`` and inside babai-ao's calibration and perplexity
(``kernels.cpu_int4.exact_forwards``) the reference, which decodes on every call (run
``decode_model`` there before export).
``prepare_hptq_cpu(weight, bias)`` gives the same form as a module (``prepare_cpu``).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import return_and_correct_aliasing
from torchao.utils import TorchAOBaseTensor, fill_defaults

from babai_ao._moved import old_names
from babai_ao.errors import BabaiError
from babai_ao.formats import huffman
from babai_ao.formats.hptq import HPTQWeight, compute_form
from babai_ao.kernels import cpu_hptq, cpu_int4

from . import (
    integrity,
    ops,  # noqa: F401  (registers babai::hptq_linear)
)
from .cpu_layout import CPULayoutCache, exclude_from_pickle
from .tensor import (
    FLOAT_DTYPES,
    BabaiQuantizedTensor,
    certificate_from_json,
    certificate_to_json,
    cpu_int4pack_applies,
)

STREAM_NAMES = list(huffman.FIELDS)


class HuffmanQuantizedTensor(CPULayoutCache, TorchAOBaseTensor):
    """An HPTQ/HRTN weight [N, K] in its stored (Huffman-coded) form."""

    tensor_data_names = [*STREAM_NAMES, "scale"]
    tensor_attribute_names = ["shape", "dtype"]
    # chunk/max_len repeat header[1:] as Python ints, so compile never reads the header
    optional_tensor_attribute_names = ["certificate_json", "chunk", "max_len"]
    # kernels.cpu_hptq's layout (a cache, never saved: ``cpu_layout``)
    cpu_layout_names = ["cpu_hptq_layout"]
    cpu_hptq_layout: torch.Tensor | None = None

    def __new__(cls, bitstream, symbols, lengths, offsets, header, scale, shape, dtype,
                certificate_json=None, chunk=None, max_len=None):
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, tuple(shape), dtype=dtype, device=bitstream.device, requires_grad=False)

    def __init__(self, bitstream: torch.Tensor, symbols: torch.Tensor, lengths: torch.Tensor,
                 offsets: torch.Tensor, header: torch.Tensor, scale: torch.Tensor, shape: Any,
                 dtype: torch.dtype, certificate_json: str | None = None,
                 chunk: int | None = None, max_len: int | None = None):
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2 or dtype not in FLOAT_DTYPES:
            raise BabaiError(f"an HPTQ weight is 2-D with a float dtype, got {shape}, {dtype}")
        concrete = not is_fake(header) and header.device.type != "meta"  # not under tracing
        if tuple(header.shape) != (3,) or (concrete and int(header[0]) != shape[0] * shape[1]):
            raise BabaiError(f"the Huffman header does not describe a {shape[0]}×{shape[1]} "
                             "weight: the checkpoint belongs to another layer or is corrupt")
        if scale.numel() not in (1, shape[0]):
            raise BabaiError(f"HPTQ scale must hold 1 or {shape[0]} values, got "
                             f"{scale.numel()}: the checkpoint is corrupt")
        self.bitstream, self.symbols, self.lengths = bitstream, symbols, lengths
        self.offsets, self.header, self.scale = offsets, header, scale
        self.certificate_json = certificate_json
        if concrete:
            stored = (int(header[1]), int(header[2]))
            if (chunk, max_len) not in ((None, None), stored):
                raise BabaiError(f"chunk/max_len {chunk}/{max_len} disagree with the stream "
                                 f"header {stored}: the checkpoint is corrupt")
            chunk, max_len = stored
        self.chunk, self.max_len = int(chunk), int(max_len)

    @classmethod
    def from_hptq(cls, hw: HPTQWeight, dtype: torch.dtype = torch.float32
                  ) -> HuffmanQuantizedTensor:
        t = hw.tensors()
        return cls(*(t[f"huffman_{n}"] for n in STREAM_NAMES), t["scales"],
                   (hw.out_features, hw.in_features), dtype,
                   certificate_to_json(hw.certificate))

    def hptq_weight(self) -> HPTQWeight:
        stream = huffman.HuffmanStream(*(getattr(self, n).cpu() for n in STREAM_NAMES))
        return HPTQWeight(stream, self.scale.cpu(), int(self.shape[0]), int(self.shape[1]),
                          self.certificate)  # type: ignore[arg-type]

    @property
    def certificate(self):
        return certificate_from_json(self.certificate_json)

    def cpu_layout_eligible(self) -> bool:
        """On the CPU, with a window group size dividing ``K`` (any ``N``)."""
        return (self.bitstream.device.type == "cpu"
                and cpu_hptq.group_size_for(int(self.shape[1])) is not None)

    def _build_cpu_layout(self) -> tuple[torch.Tensor, ...] | None:
        """``cpu_hptq.build_layout`` of the decoded codes (``None``: too many codes off
        their 16-code windows, or the form is off)."""
        return cpu_hptq.build_layout(self.codes(), self.scale)

    @property
    def nbytes_stored(self) -> int:
        return sum(getattr(self, n).numel() * getattr(self, n).element_size()
                   for n in self.tensor_data_names)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes_stored / (int(self.shape[0]) * int(self.shape[1]))

    def codes(self) -> torch.Tensor:
        """Signed codes [N, K] on the weight's device (Triton decode kernel on CUDA)."""
        n, k = (int(s) for s in self.shape)
        if self.bitstream.is_cuda:
            from babai_ao.kernels.huffman import decode_table, huffman_decode

            table = decode_table(self.symbols, self.lengths, self.max_len)
            flat = huffman_decode(self.bitstream, self.offsets, table, n * k, self.chunk,
                                  self.max_len)
            return flat.reshape(n, k)
        return self.hptq_weight().codes()

    def decode(self) -> BabaiQuantizedTensor:
        """The compute form: an 8-bit ``BabaiQuantizedTensor`` (CSR beyond int8)."""
        device = self.bitstream.device
        row_scales = self.scale.expand(int(self.shape[0])).reshape(-1, 1)
        args = compute_form(self.codes(), row_scales)
        out = BabaiQuantizedTensor(
            args["packed"].to(device), args["scales"].to(device), args["zeros"].to(device),
            8, args["group_size"], tuple(self.shape), self.dtype,
            *(None if args.get(n) is None else args[n].to(device)
              for n in ("outlier_ptr", "outlier_idx", "outlier_val")))
        out.certificate_json = self.certificate_json
        return out

    def _check_stored_values(self) -> str | None:
        """What is wrong with the stored values, if anything (``integrity.check_structure``:
        checkpoints without a digest): the scale(s), then the stream's codebook and chunk
        index (``huffman.stream_problem``)."""
        if integrity.bad_scales(self.scale):
            return "a scale that is not finite and positive"
        stream = huffman.HuffmanStream(*(getattr(self, n).detach().cpu() for n in STREAM_NAMES))
        return huffman.stream_problem(stream)

    def _stable_hash_for_caching(self) -> str:
        """Compile-cache key: the layout (attributes, inner shapes/dtypes, the CPU layout's
        too) and the CPU kernel mode, not the values."""
        parts = [type(self).__qualname__, tuple(self.shape), str(self.dtype), self.chunk,
                 self.max_len, cpu_int4.MODE]  # the mode picks the kernel
        for name in self.__tensor_flatten__()[0]:
            t = getattr(self, name)
            parts.append((name, tuple(t.shape), str(t.dtype), str(t.device)))
        return hashlib.blake2b(repr(parts).encode(), digest_size=16).hexdigest()

    def dequantize(self, output_dtype: torch.dtype | None = None) -> torch.Tensor:
        w = self.hptq_weight().dequantize(torch.float32)
        return w.to(device=self.bitstream.device, dtype=output_dtype or self.dtype)

    def __repr__(self) -> str:
        return (f"HuffmanQuantizedTensor(shape={tuple(self.shape)}, "
                f"bits_per_weight={self.bits_per_weight:.3f}, dtype={self.dtype})")


implements = HuffmanQuantizedTensor.implements
implements_torch_function = HuffmanQuantizedTensor.implements_torch_function


@implements(torch.ops.aten.linear.default)
@implements_torch_function(torch.nn.functional.linear)
def _(func, types, args, kwargs):
    """On CPU by default ``cpu_hptq.linear`` on the layout kept on the weight (nibbles of
    each group's 16-code window + sparse correction, fp32 sums), built on the
    first call; else (exact mode, other devices, a gradient for ``x``, a layer the layout
    does not fit) ``babai::hptq_linear``."""
    x, weight, bias = fill_defaults(args, 3, [None])
    bias = kwargs.get("bias", bias) if kwargs else bias
    if not isinstance(weight, HuffmanQuantizedTensor):
        raise BabaiError("a HuffmanQuantizedTensor can only be the weight of a linear")
    if cpu_int4pack_applies(x) and not (torch.is_grad_enabled() and x.requires_grad):
        layout = weight.cpu_layout(build=not torch.compiler.is_compiling())
        if layout is not None:
            return cpu_hptq.linear(x, layout[0], bias, int(weight.shape[0]))
    return torch.ops.babai.hptq_linear(
        x, weight.bitstream, weight.symbols, weight.lengths, weight.offsets, weight.scale, bias,
        int(weight.shape[0]), int(weight.shape[1]), weight.chunk, weight.max_len)


@implements(torch.ops.aten._to_copy.default)
def _(func, types, args, kwargs):
    """``.to(device, dtype)``: moves the stream; the dtype is the compute dtype (the codes and
    scale stay as stored)."""
    self = args[0]
    kw = self._get_to_kwargs(*args[1:], **kwargs)
    if kw["dtype"] not in FLOAT_DTYPES:
        raise BabaiError(f"cannot cast an HPTQ weight to {kw['dtype']}: dequantize() first")
    moved = [getattr(self, n).to(kw["device"], non_blocking=kw["non_blocking"])
             for n in self.tensor_data_names]
    new = HuffmanQuantizedTensor(*moved, tuple(self.shape), kw["dtype"], self.certificate_json,
                                 self.chunk, self.max_len)
    if all(m is getattr(self, n) for m, n in zip(moved, self.tensor_data_names)):
        self._carry_cpu_layout(new)  # a dtype cast on the same device: the same layout
    return return_and_correct_aliasing(func, args, kwargs, new)


def prepare_hptq_cpu(weight: torch.Tensor, bias: torch.Tensor | None = None
                     ) -> nn.Module | None:
    """The CPU inference layer for an HPTQ weight ``W = s_n·C``: ``Int4SparseLinear``
    (nibbles of each group's 16-code window + sparse correction, exactly ``W``), or ``None``
    where that form does not apply or does not pay (``kernels.cpu_hptq.prepare_hptq_cpu``).

    ``weight`` is a ``HuffmanQuantizedTensor`` (stored form, decoded here) or an 8-bit
    ``BabaiQuantizedTensor`` with one group per row — HPTQ's decoded form (then ``C = q − z``
    with its CSR deltas added, ``s_n`` its row scales).
    """
    from babai_ao.kernels.cpu_hptq import prepare_hptq_cpu as build

    if weight.device.type != "cpu":
        return None
    if isinstance(weight, HuffmanQuantizedTensor):
        return build(weight.codes(), weight.scale, bias)
    if (isinstance(weight, BabaiQuantizedTensor) and not weight.transposed
            and weight.bits == 8 and weight.group_size == weight.in_features):
        return build(weight.codes() - weight.zero_points(), weight.scale.reshape(-1), bias)
    return None


def decode_model(model: nn.Module) -> int:
    """Replace every ``HuffmanQuantizedTensor`` weight by its decoded compute form.

    Returns the number of weights decoded.
    """
    count = 0
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(w, nn.Parameter) and isinstance(w.detach(), HuffmanQuantizedTensor):
            module.weight = nn.Parameter(w.detach().decode(), requires_grad=False)
            count += 1
    return count


integrity.install(HuffmanQuantizedTensor)  # digest in torch.save pickles, checked on torch.load
exclude_from_pickle(HuffmanQuantizedTensor)  # the CPU layout is rebuilt after loading
torch.serialization.add_safe_globals([HuffmanQuantizedTensor, *old_names(HuffmanQuantizedTensor)])
