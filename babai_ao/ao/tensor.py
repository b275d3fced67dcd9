"""``BabaiQuantizedTensor``: a torchao tensor subclass holding one packed quantized weight.

Stored tensors (the names are torchao's and transformers' ``qdata``/``scale``/``zero_point``,
so safetensors checkpoints load through transformers' torchao integration):

* ``qdata``: uint8 [N, ceil(K/8)·b], the b-bit codes packed per row (``babai_ao.formats.packing``),
  always in the weight's original column order (static groups: no permutation at run time);
* ``scale``: [N, G] scales (float16, exactly the grid the quantizer used);
* ``zero_point``: uint8, the N·G zero codes packed flat at b bits;
* optional ``outlier_ptr`` / ``outlier_idx`` / ``outlier_val``: SSQR's CSR correction δ.

The weight it stands for is ``W[n, k] = s[n, k//g]·(q[n, k] − z[n, k//g]) + s[n, k//g]·δ[n, k]``
(shape [N, K]; ``transposed`` marks the logical view ``Wᵀ`` made by ``.t()``, the data stay
as they are). Every matmul with it — ``F.linear``, ``aten.linear``, ``mm``, ``addmm`` — goes
through :func:`babai_linear`: on CPU, a layer the int4pack kernel holds (4-bit, groups
32–256, ``N % 16 = 0``, no outliers) with fp32 or bf16 activations runs
``aten._weight_int4pack_mm_for_cpu`` itself (``babai_ao.kernels.cpu_int4``: activations
rounded to bf16, so a compiled graph calls the kernel with no custom-op round trip);
everything else, and everything under ``babai_ao.cpu_kernel("exact")``, calls the one
custom op ``torch.ops.babai.linear`` (exact on CPU for fp32 activations).

The kernel's layout of such a weight (``cpu_int4pack``, ``cpu_scale_zero``; ≈ 4 + 32/g bits
per weight) is built once — on the first eager call, or when ``torch.compile`` first looks
at the tensor (``__tensor_flatten__`` under compile) — and kept on the tensor: it travels
through compile as two more inner tensors, is carried by ``.t()``/dtype casts, rebuilt by
an in-place ``copy_``, and is never saved (not a data name: ``torch.save``, safetensors and
the digest see only the stored format).

The certificate (``babai_ao.lattice.quantize.Certificate``) travels as ``certificate_json``, a JSON
string attribute (pivots as a list of floats, then the scalar fields). A string keeps it
hashable for ``torch.compile`` guards and JSON-able for torchao's safetensors metadata, and
``torch.save`` pickles it as is. ``bits_per_weight`` counts the stored bytes of the data
tensors above (not the certificate, which is not needed to compute).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import torch
from torch.utils._python_dispatch import return_and_correct_aliasing
from torchao.utils import TorchAOBaseTensor, fill_defaults

from babai_ao._moved import old_names
from babai_ao.errors import BabaiError
from babai_ao.formats.packing import pack, packed_size, unpack
from babai_ao.kernels import cpu_int4
from babai_ao.lattice.quantize import Certificate, QuantizedWeight, quantize_weight

from . import integrity, ops
from .cpu_layout import CPULayoutCache, exclude_from_pickle

aten = torch.ops.aten
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def certificate_to_json(cert: Certificate | None) -> str | None:
    """The certificate as a JSON string (``None`` stays ``None``)."""
    if cert is None:
        return None
    fields = {f.name: getattr(cert, f.name) for f in dataclasses.fields(cert)}
    pivots = fields.pop("pivots")
    fields["pivots"] = pivots.detach().cpu().tolist()
    fields["pivots_dtype"] = str(pivots.dtype).removeprefix("torch.")
    return json.dumps(fields)


def certificate_from_json(text: str | None) -> Certificate | None:
    """Inverse of :func:`certificate_to_json` (bit-exact for float32/float64 pivots)."""
    if text is None:
        return None
    try:
        fields = json.loads(text)
        dtype = getattr(torch, fields.pop("pivots_dtype"))
        fields["pivots"] = torch.tensor(fields["pivots"], dtype=dtype)
        return Certificate(**fields)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise BabaiError(f"the stored certificate is corrupt ({e}): re-save the checkpoint "
                         "from the quantized model") from None


class BabaiQuantizedTensor(CPULayoutCache, TorchAOBaseTensor):
    """A b-bit group-quantized weight [N, K] (or its transpose) in babai-ao's packed format."""

    tensor_data_names = ["qdata", "scale", "zero_point"]
    tensor_attribute_names = ["bits", "group_size", "shape", "dtype"]
    optional_tensor_data_names = ["outlier_ptr", "outlier_idx", "outlier_val"]
    optional_tensor_attribute_names = ["transposed", "certificate_json"]
    cpu_layout_names = ["cpu_int4pack", "cpu_scale_zero"]  # a cache: never saved
    cpu_int4pack: torch.Tensor | None = None  # class defaults: unpickled tensors start empty
    cpu_scale_zero: torch.Tensor | None = None

    def __new__(cls, qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                bits: int, group_size: int, shape: Any, dtype: torch.dtype,
                outlier_ptr: torch.Tensor | None = None,
                outlier_idx: torch.Tensor | None = None,
                outlier_val: torch.Tensor | None = None,
                transposed: bool | None = False, certificate_json: str | None = None):
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, tuple(shape), dtype=dtype, device=qdata.device, requires_grad=False)

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                 bits: int, group_size: int, shape: Any, dtype: torch.dtype,
                 outlier_ptr: torch.Tensor | None = None,
                 outlier_idx: torch.Tensor | None = None,
                 outlier_val: torch.Tensor | None = None,
                 transposed: bool | None = False, certificate_json: str | None = None):
        super().__init__()
        shape = tuple(int(s) for s in shape)
        transposed = bool(transposed)
        if len(shape) != 2:
            raise BabaiError(f"a quantized weight is 2-D, got shape {shape}")
        if dtype not in FLOAT_DTYPES:
            raise BabaiError(f"dtype {dtype} is not a float dtype: use one of {FLOAT_DTYPES}")
        n, k = (shape[1], shape[0]) if transposed else shape
        if tuple(qdata.shape[:1]) != (n,):
            raise BabaiError(f"qdata has {tuple(qdata.shape)[:1]} rows, the weight has "
                             f"{n}: the checkpoint does not match this layer")
        ops.check_packed(qdata, scale, zero_point, bits, group_size, k)
        given = [t is not None for t in (outlier_ptr, outlier_idx, outlier_val)]
        if any(given) and not all(given):
            raise BabaiError("outlier_ptr, outlier_idx and outlier_val come together: give "
                             "all three (CSR) or none")
        if outlier_ptr is not None and (
                tuple(outlier_ptr.shape) != (n + 1,)
                or outlier_idx.dim() != 1 or outlier_idx.shape != outlier_val.shape):
            raise BabaiError(f"outliers must be CSR: ptr [{n + 1}], idx and val [nnz], got "
                             f"{tuple(outlier_ptr.shape)}, {tuple(outlier_idx.shape)}, "
                             f"{tuple(outlier_val.shape)}: the checkpoint is corrupt")
        self.qdata = qdata
        self.scale = scale
        self.zero_point = zero_point
        self.bits = int(bits)
        self.group_size = int(group_size)
        self.outlier_ptr = outlier_ptr
        self.outlier_idx = outlier_idx
        self.outlier_val = outlier_val
        self.transposed = transposed
        self.certificate_json = certificate_json

    # ---- the CPU kernel's layout (a cache: ``cpu_layout``, module docstring) -------------
    def cpu_int4pack_eligible(self) -> bool:
        """A CPU weight the int4pack kernel can hold (``cpu_int4.eligible``)."""
        return (not self.transposed and self.device.type == "cpu"
                and cpu_int4.eligible(self.bits, self.group_size, self.out_features,
                                      self.outlier_ptr is not None))

    cpu_layout_eligible = cpu_int4pack_eligible

    def _build_cpu_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(int4pack weight, scale_zero)`` (``cpu_int4.build_layout``)."""
        return cpu_int4.build_layout(self.codes(), self.scale, self.zero_points())

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_quantized(cls, qw: Any, dtype: torch.dtype = torch.float32
                       ) -> BabaiQuantizedTensor:
        """Pack a ``QuantizedWeight`` (or an ``ssqr.SSQRWeight``) as a weight of ``dtype``.

        Raises ``BabaiError`` when codes leave ``[0, 2^b − 1]`` (``clip=False`` without a
        no-clipping format to store the excess).
        """
        if isinstance(qw, QuantizedWeight):
            bits = qw.grid.bits
            maxq = 2**bits - 1
            if qw.codes.numel() and (int(qw.codes.min()) < 0 or int(qw.codes.max()) > maxq):
                raise BabaiError(
                    f"codes run outside [0, {maxq}] (quantized with clip=False): a plain "
                    f"{bits}-bit tensor cannot store them; quantize with clip=True or use "
                    "a no-clipping format (clip='ssqr')")
            n, k = qw.codes.shape
            packed = pack(qw.codes, bits)
            zeros = pack(qw.zeros.reshape(1, -1), bits).reshape(-1)
            return cls._build(packed, qw.scales, zeros, bits, qw.group_size, (n, k), dtype,
                              None, qw.certificate)
        if hasattr(qw, "csr") and hasattr(qw, "packed"):  # ssqr.SSQRWeight
            csr = qw.csr
            ptr, idx, val = (csr.ptr, csr.idx, csr.val) if csr.nnz else (None, None, None)
            return cls._build(qw.packed, qw.scales, qw.zeros, qw.bits, qw.group_size,
                              (qw.out_features, qw.in_features), dtype, (ptr, idx, val),
                              qw.certificate)
        raise BabaiError(f"from_quantized takes a babai_ao.QuantizedWeight (or an SSQR weight), "
                         f"got {type(qw).__name__}: quantize with babai_ao.quantize_weight")

    @classmethod
    def _build(cls, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
               group_size: int, shape: tuple[int, int], dtype: torch.dtype,
               csr: tuple | None, cert: Certificate | None) -> BabaiQuantizedTensor:
        ptr, idx, val = csr if csr is not None else (None, None, None)
        out = cls(packed, scales, zeros, bits, group_size, shape, dtype, ptr, idx, val)
        if cert is not None:
            cert = dataclasses.replace(cert, bits_per_weight=out.bits_per_weight)
        out.certificate_json = certificate_to_json(cert)
        return out

    @classmethod
    def from_hp(cls, weight: torch.Tensor, bits: int = 4, group_size: int | None = 128,
                symmetric: bool = False, scale_dtype: torch.dtype = torch.float16
                ) -> BabaiQuantizedTensor:
        """Round-to-nearest (``H = I``) on the same grid as ``babai_config``; dtype kept.

        Quantizing is offline, data-dependent Python: ``torch.compile`` runs it eagerly.
        """
        qw = _quantize_eager(weight, None, bits=bits, group_size=group_size,
                             symmetric=symmetric, clip=True, scale_dtype=scale_dtype)
        return cls.from_quantized(qw, weight.dtype)

    # ---- views of the data --------------------------------------------------------------
    @property
    def out_features(self) -> int:
        return int(self.qdata.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.shape[0] if self.transposed else self.shape[1])

    @property
    def packed(self) -> torch.Tensor:
        return self.qdata

    @property
    def scales(self) -> torch.Tensor:
        return self.scale

    @property
    def zeros(self) -> torch.Tensor:
        return self.zero_point

    @property
    def certificate(self) -> Certificate | None:
        return certificate_from_json(self.certificate_json)

    @property
    def nbytes_stored(self) -> int:
        """Bytes of every stored data tensor (codes, scales, zeros, outliers)."""
        names = self._stored_names()
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in names)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes_stored / (self.out_features * self.in_features)

    def codes(self) -> torch.Tensor:
        """Unpacked codes, int64 [N, K] (with SSQR's outlier deltas added)."""
        q = unpack(self.qdata, self.bits, self.in_features).to(torch.int64)
        if self.outlier_ptr is not None:
            counts = (self.outlier_ptr[1:] - self.outlier_ptr[:-1]).long()
            rows = torch.repeat_interleave(torch.arange(self.out_features), counts)
            q.index_put_((rows, self.outlier_idx.long()), self.outlier_val.long(),
                         accumulate=True)
        return q

    def zero_points(self) -> torch.Tensor:
        n, g = self.scale.shape
        return unpack(self.zero_point.reshape(1, -1), self.bits, n * g).reshape(n, g).long()

    def dequantize(self, output_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight ``W`` (``Wᵀ`` when transposed) in ``output_dtype`` (default: dtype)."""
        w = torch.ops.babai.dequantize(
            self.qdata, self.scale, self.zero_point, self.bits, self.group_size,
            self.in_features, self.outlier_ptr, self.outlier_idx, self.outlier_val,
            output_dtype or self.dtype)
        return w.t() if self.transposed else w

    def _check_stored_values(self) -> str | None:
        """What is wrong with the stored values, if anything (``integrity.check_structure``:
        checkpoints without a digest). Every bit pattern of the packed codes and zeros is a
        valid code, so only the scales (finite, positive) and the CSR index are checked."""
        if integrity.bad_scales(self.scale):
            return "scales that are not finite and positive"
        if self.outlier_ptr is None:
            return None
        ptr, idx = self.outlier_ptr.detach().cpu().long(), self.outlier_idx.detach().cpu()
        if int(ptr[0]) != 0 or int(ptr[-1]) != idx.numel() or bool((ptr[1:] < ptr[:-1]).any()):
            return "outlier row pointers that are not a CSR index"
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.in_features):
            return f"outlier columns outside [0, {self.in_features})"
        return None

    def _stored_names(self) -> list[str]:
        """The data tensors present, without the CPU layout cache."""
        return [n for n in integrity.data_names(type(self)) if getattr(self, n) is not None]

    def _stable_hash_for_caching(self) -> str:
        """Compile-cache key: the layout (attributes, inner shapes/dtypes) and the CPU kernel
        mode, not the values."""
        parts = [type(self).__qualname__, self.bits, self.group_size, tuple(self.shape),
                 str(self.dtype), self.transposed, cpu_int4.MODE]  # the mode picks the kernel
        for name in self.__tensor_flatten__()[0]:
            t = getattr(self, name)
            parts.append((name, tuple(t.shape), tuple(t.stride()), str(t.dtype), str(t.device)))
        return hashlib.blake2b(repr(parts).encode(), digest_size=16).hexdigest()

    def _quantization_type(self) -> str:
        nnz = 0 if self.outlier_idx is None else self.outlier_idx.numel()
        return (f"shape={tuple(self.shape)}, bits={self.bits}, group_size={self.group_size}, "
                f"outliers={nnz}, transposed={self.transposed}, device={self.device}")

    def __repr__(self) -> str:
        return f"BabaiQuantizedTensor({self._quantization_type()}, dtype={self.dtype})"

    def _with(self, **changes: Any) -> BabaiQuantizedTensor:
        """A new tensor with some constructor arguments replaced; the CPU layout comes along
        when the stored tensors are the same objects (a view, a dtype cast)."""
        args = {name: getattr(self, name) for name in (
            *self.tensor_data_names, *self.tensor_attribute_names,
            *self.optional_tensor_data_names, *self.optional_tensor_attribute_names)}
        args["shape"] = tuple(self.shape)
        args.update(changes)
        out = BabaiQuantizedTensor(**args)
        if all(getattr(out, n) is getattr(self, n) for n in integrity.data_names(type(self))):
            self._carry_cpu_layout(out)
        return out


_quantize_eager = torch.compiler.disable(quantize_weight)


def babai_linear(x: torch.Tensor, weight: BabaiQuantizedTensor, bias: torch.Tensor | None
                 ) -> torch.Tensor:
    """``x @ Wᵀ + bias``: the single dequant-matmul entry point — the int4pack kernel on CPU
    where it applies (:func:`cpu_int4pack_applies`), else ``torch.ops.babai.linear``."""
    if weight.transposed:
        raise BabaiError("F.linear got a transposed BabaiQuantizedTensor (weight.t()): pass "
                         "the weight itself, [out_features, in_features]")
    if isinstance(bias, BabaiQuantizedTensor):
        raise BabaiError("the bias of a quantized linear must be a plain tensor")
    if cpu_int4pack_applies(x):
        # eager: build the layout on the first call; compiled: it came with the weight
        layout = weight.cpu_layout(build=not torch.compiler.is_compiling())
        if layout is not None:
            mm = None
            if torch.is_grad_enabled() and x.requires_grad:
                def mm(x2, w4, sz):
                    return _Int4PackMatmul.apply(x2, w4, sz, weight.qdata, weight.scale,
                                                 weight.zero_point, weight.group_size,
                                                 weight.in_features)
            return cpu_int4.linear(x, *layout, bias, weight.group_size, weight.in_features, mm)
    return torch.ops.babai.linear(
        x, weight.qdata, weight.scale, weight.zero_point, bias, weight.bits,
        weight.group_size, weight.in_features, weight.outlier_ptr, weight.outlier_idx,
        weight.outlier_val)


def cpu_int4pack_applies(x: torch.Tensor) -> bool:
    """Mode ``"auto"`` outside ``cpu_int4.exact_forwards()`` (eager), CPU, fp32/bf16
    activations, not exporting (export keeps ``babai::linear``)."""
    return (cpu_int4.default_path_on() and x.device.type == "cpu"
            and x.dtype in cpu_int4.ACTIVATION_DTYPES and not torch.compiler.is_exporting())


class _Int4PackMatmul(torch.autograd.Function):
    """The int4pack kernel ``x2 [M, K] bf16 → x2 @ Wᵀ`` (bf16) with ``∂/∂x2 = grad · W``,
    ``W`` dequantized exactly from the stored codes (the aten kernel has no backward)."""

    @staticmethod
    def forward(ctx, x2, w4, scale_zero, qdata, scale, zero_point, group_size, in_features):
        ctx.save_for_backward(qdata, scale, zero_point)
        ctx.meta = (group_size, in_features)
        return cpu_int4.matmul(x2, w4, scale_zero, group_size)

    @staticmethod
    def backward(ctx, grad):
        qdata, scale, zero_point = ctx.saved_tensors
        group_size, in_features = ctx.meta
        w = torch.ops.babai.dequantize(qdata, scale, zero_point, 4, group_size, in_features,
                                       None, None, None, torch.float32)
        grad_x = (grad.to(torch.float32) @ w).to(grad.dtype)
        return grad_x, None, None, None, None, None, None, None


implements = BabaiQuantizedTensor.implements
implements_torch_function = BabaiQuantizedTensor.implements_torch_function


@implements(aten.linear.default)
@implements_torch_function(torch.nn.functional.linear)
def _(func, types, args, kwargs):
    x, weight, bias = fill_defaults(args, 3, [None])
    bias = kwargs.get("bias", bias) if kwargs else bias
    if not isinstance(weight, BabaiQuantizedTensor):
        raise BabaiError("a BabaiQuantizedTensor can only be the weight of a linear")
    return babai_linear(x, weight, bias)


def _mm_weight(w: Any) -> BabaiQuantizedTensor:
    """``mm(x, w)`` computes ``x @ w``: only ``w = Wᵀ`` (a transposed weight) is a linear."""
    if not isinstance(w, BabaiQuantizedTensor) or not w.transposed:
        raise BabaiError("mm/addmm with a BabaiQuantizedTensor needs it as the right operand "
                         "in transposed form (x @ weight.t()); dequantize() it for other "
                         "products")
    return w._with(transposed=False, shape=(w.shape[1], w.shape[0]))


@implements(aten.mm.default)
def _(func, types, args, kwargs):
    x, w = args
    return babai_linear(x, _mm_weight(w), None)


@implements(aten.addmm.default)
def _(func, types, args, kwargs):
    bias, x, w = args[:3]
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    if beta != 1 or alpha != 1:
        raise BabaiError("addmm with beta/alpha != 1 is not a linear layer: dequantize() first")
    return babai_linear(x, _mm_weight(w), bias)


@implements(aten.embedding.default)
def _(func, types, args, kwargs):
    """``weight[indices]`` through ``babai::embedding``: only the looked-up rows are
    dequantized."""
    weight, indices = args[:2]
    if not isinstance(weight, BabaiQuantizedTensor) or isinstance(indices, BabaiQuantizedTensor):
        raise BabaiError("a BabaiQuantizedTensor can only be the table of an embedding")
    return ops.babai_embedding(indices, weight)


@implements([aten.t.default, aten.transpose.int])
def _(func, types, args, kwargs):
    self = args[0]
    if func is aten.transpose.int:
        dims = {d % 2 for d in args[1:3]}
        if dims != {0, 1}:
            return return_and_correct_aliasing(func, args, kwargs, self._with())
    new = self._with(transposed=not self.transposed, shape=(self.shape[1], self.shape[0]))
    return return_and_correct_aliasing(func, args, kwargs, new)


@implements(aten._to_copy.default)
def _(func, types, args, kwargs):
    self = args[0]
    kw = self._get_to_kwargs(*args[1:], **kwargs)
    device, dtype = kw["device"], kw["dtype"]
    if dtype not in FLOAT_DTYPES:
        raise BabaiError(f"cannot cast a quantized weight to {dtype}: dequantize() first")

    def move(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device, non_blocking=kw["non_blocking"])

    new = self._with(dtype=dtype, **{n: move(getattr(self, n)) for n in (
        *self.tensor_data_names, *self.optional_tensor_data_names)})
    return return_and_correct_aliasing(func, args, kwargs, new)


@implements(aten.equal.default)
def _(func, types, args, kwargs):
    """Same layout and the same stored tensors (what transformers checks for tied weights)."""
    a, b = args[0], args[1]
    if not (isinstance(a, BabaiQuantizedTensor) and isinstance(b, BabaiQuantizedTensor)):
        return False
    names_a, attrs_a = a._stored_names(), a.__tensor_flatten__()[1]
    names_b, attrs_b = b._stored_names(), b.__tensor_flatten__()[1]
    return (names_a == names_b and attrs_a == attrs_b and tuple(a.shape) == tuple(b.shape)
            and all(torch.equal(getattr(a, n), getattr(b, n)) for n in names_a))


@implements(aten.copy_.default)
def _(func, types, args, kwargs):
    dst, src = args[:2]
    if not isinstance(dst, BabaiQuantizedTensor) or not isinstance(src, BabaiQuantizedTensor):
        raise BabaiError("cannot copy between a BabaiQuantizedTensor and a plain tensor: load "
                         "quantized checkpoints with load_state_dict(..., assign=True) or "
                         "quantize the model with the same config first")
    for name in ("bits", "group_size", "transposed"):
        if getattr(dst, name) != getattr(src, name):
            raise BabaiError(f"checkpoint {name}={getattr(src, name)} does not match the "
                             f"model's {name}={getattr(dst, name)}: quantize the model with "
                             "the checkpoint's config or load with assign=True")
    if tuple(dst.shape) != tuple(src.shape):
        raise BabaiError(f"checkpoint shape {tuple(src.shape)} does not match the model's "
                         f"{tuple(dst.shape)}: the checkpoint belongs to another model")
    names = dst.tensor_data_names + dst.optional_tensor_data_names
    for name in names:
        a, b = getattr(dst, name), getattr(src, name)
        if (a is None) != (b is None) or (a is not None and a.shape != b.shape):
            raise BabaiError(f"checkpoint {name} does not fit the model's in place (different "
                             "outlier count or layout): load with assign=True")
    for name in names:
        if getattr(dst, name) is not None:
            getattr(dst, name).copy_(getattr(src, name))
    dst.certificate_json = src.certificate_json
    if dst.cpu_int4pack is not None:  # same shapes: refill in place (compiled graphs hold it)
        weight, scale_zero = cpu_int4.build_layout(dst.codes(), dst.scale, dst.zero_points())
        dst.cpu_int4pack.copy_(weight)
        dst.cpu_scale_zero.copy_(scale_zero)
    return dst


def _slice_rows(self: BabaiQuantizedTensor, start: int, end: int) -> dict[str, Any]:
    """Rows ``start:end`` of ``W`` (codes and scales are views; zeros are repacked)."""
    zeros = self.zero_points()[start:end]
    changes: dict[str, Any] = dict(
        qdata=self.qdata[start:end], scale=self.scale[start:end],
        zero_point=pack(zeros.reshape(1, -1), self.bits).reshape(-1), certificate_json=None)
    if self.outlier_ptr is not None:
        a, b = int(self.outlier_ptr[start]), int(self.outlier_ptr[end])
        changes.update(outlier_ptr=self.outlier_ptr[start:end + 1] - a,
                       outlier_idx=self.outlier_idx[a:b], outlier_val=self.outlier_val[a:b])
    return changes


def _slice_cols(self: BabaiQuantizedTensor, start: int, end: int) -> dict[str, Any]:
    """Columns ``start:end`` of ``W``: whole groups only."""
    g = self.group_size
    if start % g or end % g or start % 8 or end % 8:
        raise BabaiError(f"can slice in_features only at group boundaries (multiples of "
                         f"group_size={g} and of 8), got {start}:{end}")
    if self.outlier_ptr is not None:
        raise BabaiError("slicing in_features of a weight with outliers is not supported: "
                         "dequantize() first")
    zeros = self.zero_points()[:, start // g:end // g]
    return dict(qdata=self.qdata[:, packed_size(start, self.bits):packed_size(end, self.bits)],
                scale=self.scale[:, start // g:end // g],
                zero_point=pack(zeros.reshape(1, -1), self.bits).reshape(-1),
                certificate_json=None)


@implements(aten.slice.Tensor)
def _(func, types, args, kwargs):
    self, dim, start, end, step = fill_defaults(args, 5, [0, None, None, 1])
    if step != 1:
        raise BabaiError(f"slice step {step} is not supported on a quantized weight")
    dim = dim % 2
    size = self.shape[dim]
    start = 0 if start is None else max(0, start + size if start < 0 else start)
    end = size if end is None else min(size, end + size if end < 0 else end)
    if start == 0 and end == size:
        return return_and_correct_aliasing(func, args, kwargs, self._with())
    logical_rows = (dim == 0) != self.transposed  # slicing dim of W = [N, K]
    changes = _slice_rows(self, start, end) if logical_rows else _slice_cols(self, start, end)
    shape = list(self.shape)
    shape[dim] = end - start
    return self._with(shape=tuple(shape), **changes)


def _linear_setup_context(ctx, inputs, output) -> None:
    x, packed, scales, zeros, bias, bits, group_size, in_features, ptr, idx, val = inputs[:11]
    act_perm = inputs[11] if len(inputs) > 11 else None
    ctx.save_for_backward(packed, scales, zeros, ptr, idx, val, act_perm)
    ctx.meta = (bits, group_size, in_features, x.dtype, bias is not None)


def _linear_backward(ctx, grad):
    """``∂/∂x = grad · W`` (scattered back through ``act_perm``), ``∂/∂bias = Σ grad``;
    the quantized weight gets none."""
    packed, scales, zeros, ptr, idx, val, act_perm = ctx.saved_tensors
    bits, group_size, in_features, x_dtype, has_bias = ctx.meta
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = torch.ops.babai.dequantize(packed, scales, zeros, bits, group_size, in_features,
                                       ptr, idx, val, torch.float32)
        gx = grad.to(torch.float32) @ w
        if act_perm is not None:
            gx = torch.zeros_like(gx).index_add_(-1, act_perm, gx)
        grad_x = gx.to(x_dtype)
    if has_bias and ctx.needs_input_grad[4]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return (grad_x, None, None, None, grad_bias, None, None, None, None, None, None, None)


# babai::linear's autograd (input and bias gradients): compile builds a joint graph whenever
# a bias or input requires grad, and an op without a formula fails there.
torch.library.register_autograd("babai::linear", _linear_backward,
                                setup_context=_linear_setup_context)
integrity.install(BabaiQuantizedTensor)  # digest in torch.save pickles, checked on torch.load
exclude_from_pickle(BabaiQuantizedTensor)  # the CPU layout is rebuilt after loading
torch.serialization.add_safe_globals([BabaiQuantizedTensor, *old_names(BabaiQuantizedTensor)])
