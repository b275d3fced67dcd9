"""Block-wise tuning of the continuous parameters once a block's integer codes are fixed.

After sequential calibration of block ``b`` every quantized weight is ``Ŵ = S ⊙ C``: ``C`` the
integer matrix the format stores (``q − z`` plus SSQR's outlier deltas; HPTQ's signed codes)
and ``S`` its scales broadcast over their groups (``[N, K/g]`` for the grid formats, one per
tensor for HPTQ). With ``C`` fixed, the scales — parametrized as ``S = S₀·exp(θ)`` so they
stay positive — and the block's norm weights and biases (``p = p₀·exp(φ)`` for norm weights,
``p₀ + β`` for biases) are tuned by Adam to match the float block on the same inputs:

    L(θ, φ, β) = mean over windows and tokens of ‖f_q(x; θ, φ, β) − f_float(x)‖²

where ``x`` are the block's calibration inputs (outputs of the quantized blocks before it)
and ``f_float`` is the block as it was before quantization. Each step uses ``windows``
random windows of one calibration batch. The stored format and bit count do not change:
the tuned scales are rounded to the stored scale dtype and written back into the same
tensors. The tuned block is kept only if its loss over *all* calibration windows, with the
stored (rounded) scales, is below the untuned block's; otherwise nothing is changed. Those
two full forwards also give the block's outputs (the next block's inputs), so tuning costs
one float forward of the block (the target), one more forward, and the steps.

Inside a ``torch.distributed`` calibration each rank holds its share of the batches; the
steps draw their batch from all of them and the rank holding it computes the gradient, which
every rank receives (``distributed.share_gradients``); the full-window losses are summed
per batch over the ranks (``distributed.gather_batch_sums``). So every rank takes the same
steps and keeps or drops the same tuning as one process does with the same windows.

The certificate of each tuned layer is recomputed: ``E = tr((W − Ŵ)(H + λI)(W − Ŵ)ᵀ)`` and
its undamped form with the layer's Hessian ``H`` from calibration. Babai's bound
``B = ¼·Σⱼ dⱼsⱼ²`` is a statement about the Babai codes on the original grid, so the report
keeps that error too (``error_babai``); ``E`` after tuning is a measurement, not bounded by B.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from babai_ao.ao.hptq_tensor import STREAM_NAMES, HuffmanQuantizedTensor
from babai_ao.ao.tensor import BabaiQuantizedTensor, certificate_to_json
from babai_ao.errors import BabaiError
from babai_ao.kernels import cpu_int4
from babai_ao.lattice.hessian import damped

from . import distributed
from .blocks import run_block
from .layers import is_conv1d, is_quantizable

Inputs = Sequence[tuple[torch.Tensor, tuple, dict]]


@dataclass(frozen=True)
class TuneSettings:
    """How long and how hard to tune: ``steps`` Adam steps (0: off) at learning rate ``lr``
    on the log-scales, ``windows`` calibration windows per step, ``seed`` for their order."""

    steps: int = 0
    lr: float = 1e-3
    windows: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.windows <= 0 or not self.lr > 0:
            raise BabaiError(f"tuning settings {self}: need steps >= 0, windows > 0, lr > 0")


@dataclass
class TunedLayer:
    """What tuning did to one quantized linear (names relative to the block)."""

    name: str
    error: float  # tr(ΔH_dampedΔᵀ) after tuning
    error_undamped: float
    error_babai: float  # the certificate's error of the Babai codes before tuning


@dataclass
class TuneResult:
    loss_before: float
    loss_after: float
    kept: bool
    layers: list[TunedLayer]
    outputs: list[torch.Tensor]  # the block's outputs as kept (the next block's inputs)


def _integer_part(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(C, S₀, g)`` with ``Ŵ = S₀[:, k // g]·C`` (``g = K`` for one scale per tensor)."""
    if isinstance(weight, HuffmanQuantizedTensor):
        scale = weight.scale.detach().float().reshape(-1)
        if scale.numel() != 1:
            raise BabaiError("an HPTQ weight with more than one scale cannot be tuned")
        k = int(weight.shape[1])
        return weight.codes().float(), scale.reshape(1, 1), k
    if isinstance(weight, BabaiQuantizedTensor) and not weight.transposed:
        g = weight.group_size  # C = q − z (+ SSQR deltas, already in codes())
        c = weight.codes() - weight.zero_points().repeat_interleave(g, dim=1)
        return c.float(), weight.scale.detach().float(), g
    raise BabaiError(f"cannot tune a {type(weight).__name__} weight: tuning needs a stored "
                     "BabaiQuantizedTensor or HuffmanQuantizedTensor (not transposed)")


def _with_scale(weight: torch.Tensor, scale: torch.Tensor, certificate_json: str | None
                ) -> torch.Tensor:
    if isinstance(weight, HuffmanQuantizedTensor):
        return HuffmanQuantizedTensor(*(getattr(weight, n) for n in STREAM_NAMES),
                                      scale.to(weight.scale.dtype).reshape(weight.scale.shape),
                                      tuple(weight.shape), weight.dtype, certificate_json)
    return weight._with(scale=scale.to(weight.scale.dtype), certificate_json=certificate_json)


def _slice_windows(inp: tuple[torch.Tensor, tuple, dict], index: torch.Tensor
                   ) -> tuple[torch.Tensor, tuple, dict]:
    """The windows ``index`` of one batch: every tensor argument with ≥ 2 dimensions whose
    leading size is the batch size is indexed (hidden states, masks, positions, rotary)."""
    hidden, args, kwargs = inp
    b = hidden.shape[0]

    def pick(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == b:
            return v.index_select(0, index.to(v.device))
        if isinstance(v, tuple):
            return tuple(pick(x) for x in v)
        return v

    return pick(hidden), tuple(pick(a) for a in args), {k: pick(v) for k, v in kwargs.items()}


class _Parametrized:
    """The block's tunable parameters and the overrides that put them into a forward."""

    def __init__(self, block: nn.Module) -> None:
        self.quantized: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self.norms: dict[str, torch.Tensor] = {}
        self.biases: dict[str, torch.Tensor] = {}
        for name, m in block.named_modules():
            weight = getattr(m, "weight", None)
            if is_quantizable(m) and isinstance(weight, (BabaiQuantizedTensor,
                                                         HuffmanQuantizedTensor)):
                if is_conv1d(m):
                    raise BabaiError(f"{name}: tuning Conv1D (transposed) weights is not "
                                     "supported: run without tuning for this model")
                self.quantized[name] = _integer_part(weight.detach())
                if getattr(m, "bias", None) is not None:
                    self.biases[f"{name}.bias"] = m.bias.detach().clone()
            elif "norm" in type(m).__name__.lower() and isinstance(weight, torch.Tensor):
                self.norms[f"{name}.weight"] = weight.detach().clone()
                if getattr(m, "bias", None) is not None:
                    self.biases[f"{name}.bias"] = m.bias.detach().clone()
        self.log_scales = {n: torch.zeros_like(s0, requires_grad=True)
                           for n, (_, s0, _) in self.quantized.items()}
        self.log_norms = {n: torch.zeros_like(w, requires_grad=True)
                          for n, w in self.norms.items()}
        self.bias_shifts = {n: torch.zeros_like(b, requires_grad=True)
                            for n, b in self.biases.items()}

    def parameters(self) -> list[torch.Tensor]:
        return [*self.log_scales.values(), *self.log_norms.values(),
                *self.bias_shifts.values()]

    def scale(self, name: str, stored_dtype: torch.dtype | None = None) -> torch.Tensor:
        s = self.quantized[name][1] * self.log_scales[name].exp()
        return s if stored_dtype is None else s.to(stored_dtype).float()

    def overrides(self, stored: dict[str, torch.dtype] | None = None) -> dict[str, torch.Tensor]:
        """Parameter name → tensor, with scales rounded to ``stored[name]`` when given."""
        out: dict[str, torch.Tensor] = {}
        for name, (c, _, g) in self.quantized.items():
            s = self.scale(name, None if stored is None else stored[name])
            out[f"{name}.weight"] = s.repeat_interleave(g, dim=1) * c
        for name, w in self.norms.items():
            out[name] = w * self.log_norms[name].exp()
        for name, b in self.biases.items():
            out[name] = b + self.bias_shifts[name]
        return out


def _mse(block: nn.Module, overrides: dict[str, torch.Tensor],
         inp: tuple[torch.Tensor, tuple, dict], target: torch.Tensor) -> torch.Tensor:
    hidden, args, kwargs = inp
    out = functional_call(block, overrides, (hidden, *args), kwargs, strict=False)
    out = out[0] if isinstance(out, tuple) else out
    return (out.float() - target.float()).pow(2).mean()


def _forward_all(block: nn.Module, overrides: dict[str, torch.Tensor], inputs: Inputs,
                 targets: Sequence[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    """Mean squared error over all windows (of every rank: summed per batch, in batch
    order), and the block's outputs (on this rank's inputs)."""
    outputs, sums = [], []
    with torch.no_grad():
        for (hidden, args, kwargs), t in zip(inputs, targets):
            out = functional_call(block, overrides, (hidden, *args), kwargs, strict=False)
            out = out[0] if isinstance(out, tuple) else out
            sums.append((float((out.float() - t.float()).pow(2).sum()), float(t.numel())))
            outputs.append(out)
    where = distributed.layout()
    if where is not None:
        sums = distributed.gather_batch_sums(sums, where[1], len(where[0]))
    total, count = 0.0, 0
    for s, n in sums:
        total += s
        count += int(n)
    return total / count, outputs


def reference_outputs(reference: nn.Module, inputs: Inputs) -> list[torch.Tensor]:
    """Outputs of the float block on the calibration inputs: the tuning target."""
    with torch.no_grad():
        return [run_block(reference, inp) for inp in inputs]


def _certificate_errors(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor,
                        damp: float) -> tuple[float, float]:
    h, lam, dead = damped(hessian.to(torch.float64), damp)
    w = w.to(torch.float64).clone()
    w[:, dead] = 0
    diff = w - w_hat.to(torch.float64)
    error = float(((diff @ h) * diff).sum())
    return error, error - lam * float(diff.pow(2).sum())


@cpu_int4.exact_forwards()
def tune_block(block: nn.Module, reference: nn.Module, inputs: Inputs,
               hessians: dict[str, torch.Tensor], damp: float, settings: TuneSettings
               ) -> TuneResult:
    """Tune ``block``'s scales, norms and biases in place towards ``reference`` (its float
    copy) on ``inputs`` (module docstring); ``hessians``: each quantized linear's ``H``
    (names relative to the block) for the recomputed certificates."""
    targets = reference_outputs(reference, inputs)
    params = _Parametrized(block)
    modules = dict(block.named_modules())
    stored = {n: modules[n].weight.scale.dtype for n in params.quantized}
    loss_before, outputs = _forward_all(block, params.overrides(stored), inputs, targets)
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.Adam(params.parameters(), lr=settings.lr)
    was_training = block.training
    block.eval()
    # the batches of the whole calibration (distributed: all ranks'), this rank's first one
    sizes, first = distributed.layout() or (None, 0)
    batches = len(inputs) if sizes is None else len(sizes)
    for _ in range(settings.steps):
        i = int(torch.randint(batches, (1,), generator=generator))
        n = inputs[i][0].shape[0] if sizes is None else sizes[i]
        pick = torch.randperm(n, generator=generator)[:min(settings.windows, n)]
        owner = distributed.owner_of(i)
        optimizer.zero_grad(set_to_none=True)
        if owner == distributed.rank():  # this rank holds the batch: its gradient
            here = i - first
            loss = _mse(block, params.overrides(), _slice_windows(inputs[here], pick),
                        targets[here].index_select(0, pick.to(targets[here].device)))
            loss.backward()
        distributed.share_gradients(params.parameters(), owner)  # no-op in one process
        optimizer.step()
    block.train(was_training)
    loss_after, tuned_outputs = _forward_all(block, params.overrides(stored), inputs, targets)
    kept = loss_after < loss_before
    layers: list[TunedLayer] = []
    if not kept:
        return TuneResult(loss_before, loss_after, False, layers, outputs)
    reference_modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, m in block.named_modules():
            if name in params.quantized:
                weight = m.weight.detach()
                scale = params.scale(name, stored[name])
                c, _, g = params.quantized[name]
                w_hat = scale.repeat_interleave(g, dim=1) * c
                error, undamped = _certificate_errors(
                    reference_modules[name].weight.detach(), w_hat, hessians[name], damp)
                cert = weight.certificate
                cert_json = None
                if cert is not None:
                    layers.append(TunedLayer(name, error, undamped, cert.error))
                    cert_json = certificate_to_json(dataclasses.replace(
                        cert, error=error, error_undamped=undamped))
                m.weight = nn.Parameter(_with_scale(weight, scale, cert_json),
                                        requires_grad=False)
        for name, value in params.overrides().items():
            if name.removesuffix(".weight") in params.quantized:
                continue
            owner, _, attr = name.rpartition(".")
            getattr(modules[owner], attr).copy_(value)
    return TuneResult(loss_before, loss_after, True, layers, tuned_outputs)

