"""4-bit CPU fast path: torch's ``_weight_int4pack_mm_for_cpu`` on a layout built once.

That kernel computes ``x @ Wᵀ`` with ``W[n, k] = (q[n, k] − 8)·a[g, n] + c[g, n]`` (``g =
k // group``) from its own nibble layout (``_convert_weight_to_int4pack_for_cpu``). Our
``W = s·(q − z)`` is the same affine map with ``a = s`` and ``c = s·(8 − z)`` (both rounded
to bf16). It is only fast for bf16 activations (measured: fp32 activations take a scalar
path ~10× slower than fp32 ``mm``), so fp32 activations are cast to bf16 first and the bf16
result cast back (:func:`linear`). Eligible layers: 4-bit codes, groups of 32/64/128/256,
``N % 16 == 0``, no SSQR outliers.

Which CPU kernel a ``BabaiQuantizedTensor`` linear takes is a process-wide mode
(:func:`cpu_kernel`, env ``BABAI_CPU_KERNEL``): ``"auto"`` (default) — eligible layers run
this kernel with bf16 activations whatever the model dtype (the weight itself is exact: the
same codes, scales and zeros; only ``x`` is rounded to bf16 and the products accumulate in
fp32 inside the kernel), everything else the exact path; ``"exact"`` — every layer runs
``babai::linear``'s exact path (fp32 dequantize + fp32 ``mm``: bit-exact vs ``F.linear``
with the dequantized weight). ``BABAI_CPU_INT4PACK=0`` (older switch) means ``"exact"``.

babai-ao's own forwards whose results become codes or reported accuracy — calibration
(``quantize_model``, block tuning, the Fisher probe) and perplexity — run inside
:func:`exact_forwards`: eager fp32 forwards there take the exact path whatever the mode, so
calibrated codes do not depend on this switch, and no compiled graph is dropped (unlike a
mode change). bf16 activations keep ``babai::linear``'s int4pack branch there, as they
always had.

The layout costs 0.1–1 ms per layer to build. The tensor subclass keeps it on the weight
(``BabaiQuantizedTensor.cpu_int4pack``; ``babai_ao.ao.tensor``): ≈ 4 + 32/g extra bits
per weight (4.5 at g = 64), never saved. ``babai::linear`` called directly (plain tensors,
``PackedLinear``) keeps a cache keyed by the packed tensor (a weak reference, so a freed
model frees its entries; the tensors' version counters, so an in-place ``copy_`` rebuilds
it) and takes this kernel for bf16 activations only; ``clear_cache()`` drops that cache.

``babai_ao.prepare_cpu(model)`` (``kernels/prepare.py``) swaps eligible 4-bit linears for
``Int4PackLinear`` modules holding only the layout — no longer needed for speed (the
subclass's ``F.linear`` emits the same aten call), still there to drop the packed copy.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Iterator

import torch
from torch import nn

GROUP_SIZES = (32, 64, 128, 256)
MODES = ("auto", "exact")
ACTIVATION_DTYPES = (torch.float32, torch.bfloat16)  # fp16 would lose bits in bf16: exact


def _mode_from_env() -> str:
    if os.environ.get("BABAI_CPU_INT4PACK", "1") == "0":
        return "exact"
    mode = os.environ.get("BABAI_CPU_KERNEL", "auto")
    if mode not in MODES:
        from babai_ao.errors import BabaiError

        raise BabaiError(f"BABAI_CPU_KERNEL={mode!r} is unknown: use one of {MODES}")
    return mode


MODE = _mode_from_env()  # read by compiled code too: dynamo guards on its value
_lock = threading.Lock()

_exact_scopes = 0  # open exact_forwards() blocks, all threads (lockstep forwards are threads)
_cache: dict[int, tuple] = {}
stats = {"built": 0, "hits": 0}


def set_cpu_kernel(mode: str) -> str:
    """Set the CPU kernel mode (``"auto"`` or ``"exact"``, module docstring); returns the
    previous one. A change drops every compiled graph of the process
    (``torch.compiler.reset()``: the kernel is chosen while tracing, below the guards
    ``torch.compile`` checks), so compiled models recompile on their next call."""
    global MODE
    if mode not in MODES:
        from babai_ao.errors import BabaiError

        raise BabaiError(f"cpu_kernel mode {mode!r} is unknown: use one of {MODES}")
    with _lock:
        previous, MODE = MODE, mode
    if previous != mode:
        torch.compiler.reset()
    return previous


@contextlib.contextmanager
def cpu_kernel(mode: str) -> Iterator[None]:
    """``with babai_ao.cpu_kernel("exact"): ...`` — the mode inside the block only."""
    previous = set_cpu_kernel(mode)
    try:
        yield
    finally:
        set_cpu_kernel(previous)


@contextlib.contextmanager
def exact_forwards() -> Iterator[None]:
    """Eager forwards inside the block (any thread) take the exact path for fp32
    activations whatever the mode; compiled graphs are left as they are — neither dropped
    nor changed — and a graph traced inside follows the mode (the override is not visible
    to ``torch.compile``'s guards, so it must not be baked into a graph)."""
    global _exact_scopes
    with _lock:
        _exact_scopes += 1
    try:
        yield
    finally:
        with _lock:
            _exact_scopes -= 1


def default_path_on() -> bool:
    """Whether the subclass's default (bf16-activation int4pack) path may run here: mode
    ``"auto"`` and, in eager code, no :func:`exact_forwards` block open."""
    return MODE == "auto" and (_exact_scopes == 0 or torch.compiler.is_compiling())


def eligible(bits: int, group_size: int, out_features: int, outliers: bool = False) -> bool:
    """Whether the int4pack kernel can hold a layer of this layout."""
    return bits == 4 and group_size in GROUP_SIZES and out_features % 16 == 0 and not outliers


def supported(x_dtype: torch.dtype, bits: int, group_size: int, out_features: int) -> bool:
    """Whether ``babai::linear`` on CPU takes the int4pack kernel for these arguments
    (bf16 activations only: the op's fp32 path stays exact)."""
    return MODE == "auto" and x_dtype == torch.bfloat16 and eligible(bits, group_size,
                                                                     out_features)


def build_layout(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(int4pack weight, bf16 ``[G, N, 2]`` of ``(s, s·(8 − z))``) from codes [N, K] and
    scales/zeros [N, G]."""
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    s = scales.to(torch.float32)
    scale_zero = torch.stack([s, s * (8 - zeros.to(torch.float32))], -1)
    return weight, scale_zero.transpose(0, 1).contiguous().to(torch.bfloat16)


def layout(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
           unpack_codes, unpack_zeros) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached layout of one layer; ``unpack_codes()``/``unpack_zeros()`` give codes
    [N, K] and zeros [N, G] when it must be (re)built."""
    key = id(packed)
    versions = (_version(packed), _version(scales), _version(zeros), id(scales), id(zeros))
    entry = _cache.get(key)
    if entry is not None and entry[0]() is packed and entry[1] == versions:
        stats["hits"] += 1
        return entry[2]
    built = build_layout(unpack_codes(), scales, unpack_zeros())
    _cache[key] = (weakref.ref(packed, lambda _, k=key: _cache.pop(k, None)), versions, built)
    stats["built"] += 1
    return built


def _version(t: torch.Tensor) -> int:
    """The in-place-write counter; inference tensors have none (and cannot change outside
    inference mode), so they count as version −1."""
    try:
        return t._version
    except RuntimeError:
        return -1


def matmul(x: torch.Tensor, weight: torch.Tensor, scale_zero: torch.Tensor,
           group_size: int) -> torch.Tensor:
    """``x [M, K] bf16 @ Wᵀ`` → bf16 [M, N] (fp32 accumulation inside the kernel)."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, group_size, scale_zero)


def linear(x: torch.Tensor, weight: torch.Tensor, scale_zero: torch.Tensor,
           bias: torch.Tensor | None, group_size: int, in_features: int,
           mm=None) -> torch.Tensor:
    """``x @ Wᵀ + bias`` in ``x.dtype`` with ``x`` rounded to bf16 for the kernel (aten ops
    only, so a compiled graph calls the kernel itself); the bias is added in fp32. ``mm``
    replaces the bare kernel call ``(x2, weight, scale_zero) → bf16`` (an autograd
    function when ``x`` needs a gradient)."""
    n = weight.shape[0]
    x2 = x.reshape(-1, in_features).to(torch.bfloat16).contiguous()
    y = (mm(x2, weight, scale_zero) if mm is not None
         else matmul(x2, weight, scale_zero, group_size))
    if bias is not None:
        y = y.to(torch.float32) + bias.to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def clear_cache() -> None:
    _cache.clear()


class Int4PackLinear(nn.Module):
    """``y = x @ Wᵀ + b`` from the int4pack layout alone, computed in bf16."""

    @classmethod
    def eligible(cls, w) -> bool:
        """A 4-bit ``BabaiQuantizedTensor`` the int4pack kernel can hold."""
        return eligible(w.bits, w.group_size, w.out_features, w.outlier_ptr is not None)

    @classmethod
    def from_weight(cls, w, bias: torch.Tensor | None) -> Int4PackLinear:
        weight, scale_zero = w.cpu_layout(build=True)
        return cls(weight, scale_zero, bias, w.group_size, w.in_features)

    def __init__(self, weight: torch.Tensor, scale_zero: torch.Tensor,
                 bias: torch.Tensor | None, group_size: int, in_features: int):
        super().__init__()
        self.register_buffer("weight_int4pack", weight)
        self.register_buffer("scale_zero", scale_zero)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.group_size, self.in_features = group_size, in_features
        self.out_features = weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = matmul(x2, self.weight_int4pack, self.scale_zero, self.group_size)
        if self.bias is not None:
            y = y + self.bias.to(torch.bfloat16)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, int4pack (bf16 compute)")
