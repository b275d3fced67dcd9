"""Rate–distortion allocation of HPTQ bits across a model's layers (one λ), in two passes.

Sequential calibration knows a layer's Hessian only when the layer is reached, but the
allocation needs every layer's curve at once. So:

1. **Observe pass** (float model): ``layer_hessians`` gives every linear's ``H = XᵀX``;
   ``output_sensitivities`` gives ``w_l``, the loss's sensitivity to layer ``l``'s output
   error — an empirical Fisher probe: with ``L`` the mean next-token cross-entropy over
   ``fisher_windows`` calibration windows and ``g = ∂L/∂Y_l``, a perturbation ``δY`` raises
   ``L`` by about ``½ Σ_{t,o} g²_{t,o} δY²_{t,o}``; HPTQ's rows share one step and one
   ``tr(D)``, so their errors are equal in expectation and ``w_l = Σ_{t,o} g²_{t,o}`` (per
   token) weighs ``E_l = ‖X_l ΔW_lᵀ‖²`` as a whole. ``rate_curves`` measures each layer's stored
   bits and certificate error ``E_l`` at a few HPTQ steps (Babai, float-model ``H``).
   ``babai_ao.formats.allocation.allocate`` picks every layer's step from one λ so the
   weights' average rate is the budget; the layer's bits at that step is its target.
2. **Sequential pass**: ``quantize_model`` with the HPTQ config, each layer's rate search
   aimed at its own target (``PerLayerTargets``) instead of the shared one. The targets are
   shifted by one constant so their weight-average is exactly the budget.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from babai_ao.errors import BabaiError
from babai_ao.formats import hptq
from babai_ao.formats.allocation import RateCurve, allocate, model_error
from babai_ao.kernels import cpu_int4
from babai_ao.lattice.hessian import tiling

from .batches import calibration_batches
from .blocks import decoder_blocks
from .layers import is_quantizable, weight_matrix
from .report import QuantizationReport
from .sequential import layer_hessians, quantize_model

CURVE_OFFSETS = (-2.0, -1.0, 0.0, 1.0, 2.0)  # log2 steps around the budget's own guess


@cpu_int4.exact_forwards()
def output_sensitivities(model: nn.Module, calibration: Any, windows: int = 16,
                         batch_size: int = 4, blocks: str | None = None) -> dict[str, float]:
    """``w_l = Σ_{t,o} (∂L/∂Y_{l,t,o})² / tokens`` for every linear in the blocks, ``L`` the
    mean next-token cross-entropy of the float model on the first ``windows`` windows.

    Only activations carry gradients (weights stay frozen): the input embeddings' output is
    made to require grad, and a hook on each linear's output adds up its squared gradient.
    """
    path, stack = decoder_blocks(model, blocks)
    named = {f"{path}.{i}.{n}": m for i, b in enumerate(stack)
             for n, m in b.named_modules() if is_quantizable(m)}
    batches = calibration_batches(calibration, batch_size)
    sums = dict.fromkeys(named, 0.0)
    tokens = 0
    handles = []

    def hook_for(name: str):
        def hook(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            if out.requires_grad:
                out.register_hook(lambda g: sums.__setitem__(
                    name, sums[name] + float(g.detach().double().pow(2).sum())))
        return hook

    embed = model.get_input_embeddings()
    handles.append(embed.register_forward_hook(lambda _m, _a, out: out.requires_grad_(True)))
    handles += [m.register_forward_hook(hook_for(n)) for n, m in named.items()]
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        seen = 0
        for batch in batches:
            if seen >= windows:
                break
            ids = batch.input_ids[: windows - seen].to(device)
            mask = None if batch.attention_mask is None else \
                batch.attention_mask[: windows - seen].to(device)
            labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
            with torch.enable_grad():
                out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
                # the loss is a mean over the batch's tokens; scale to a sum so every batch
                # weighs by its tokens, and divide by all tokens at the end
                n_tok = int((labels[:, 1:] != -100).sum())
                (out.loss * n_tok).backward()
            tokens += n_tok
            seen += ids.shape[0]
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)
    if tokens == 0:
        raise BabaiError("no calibration tokens for the Fisher probe: pass windows >= 1")
    return {n: s / tokens for n, s in sums.items()}


@dataclass
class LayerPoint:
    """Diagnostics of one layer's allocation."""

    name: str
    sensitivity: float
    trace_d: float
    target_bits: float
    log2_step: float
    error_model_ratio: float  # measured E / (s² rows tr(D)/12) at the middle curve point


@dataclass
class LayerBits:
    """Per-layer target bits from one λ, and how they were found."""

    budget: float
    lam: float
    targets: dict[str, float]
    layers: list[LayerPoint] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        ratios = sorted(p.error_model_ratio for p in self.layers)
        bits = [p.target_bits for p in self.layers]
        return {"budget": self.budget, "lambda": self.lam, "seconds": self.seconds,
                "target_bits_min": min(bits), "target_bits_max": max(bits),
                "error_model_ratio_median": ratios[len(ratios) // 2],
                "error_model_ratio_min": ratios[0], "error_model_ratio_max": ratios[-1],
                "layers": [dataclasses.asdict(p) for p in self.layers]}


def rate_curves(weights: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor],
                sensitivities: dict[str, float], budget: float, order: str, damp: float,
                offsets: Iterable[float] = CURVE_OFFSETS, progress: bool = False
                ) -> tuple[list[RateCurve], dict[str, tuple[float, float]]]:
    """Every layer's HPTQ bits and certificate error at steps ``2^(x₀ + offset)``, ``x₀``
    the high-rate guess for ``budget`` bits. Also returns ``(tr D, measured/model error
    ratio at x₀)`` per layer."""
    curves, extra = [], {}
    names: Iterable[str] = list(weights)
    if progress:
        from tqdm.auto import tqdm

        names = tqdm(names, desc="rate curves", unit="layer")
    offs = sorted(offsets)
    for name in names:
        w = weights[name]
        rms = float(w.float().pow(2).mean().sqrt()) or 1.0
        x0 = math.log2(rms) + hptq.GAUSSIAN_ENTROPY_OFFSET - budget
        xs, bits, errs = [], [], []
        ratio, trace_d = float("nan"), float("nan")
        for off in offs:
            _, qw, nbytes = hptq.quantize_with_scale(w, hessians[name], 2.0 ** (x0 + off),
                                                     order=order, damp=damp, encode=False)
            cert = qw.certificate
            step = float(qw.scales.float().flatten()[0])
            xs.append(math.log2(step))
            bits.append(8 * nbytes / w.numel())
            errs.append(max(cert.error, 1e-30))
            if off == 0 or math.isnan(ratio):
                trace_d = cert.trace_d
                ratio = cert.error / model_error(step, w.shape[0], cert.trace_d)
        curves.append(RateCurve(name, w.numel(), sensitivities[name],
                                torch.tensor(xs, dtype=torch.float64),
                                torch.tensor(bits, dtype=torch.float64),
                                torch.tensor(errs, dtype=torch.float64)))
        extra[name] = (trace_d, ratio)
    return curves, extra


def allocate_layer_bits(model: nn.Module, config: Any, calibration: Any, *,
                        fisher_windows: int = 16, batch_size: int = 8,
                        blocks: str | None = None, progress: bool = True,
                        filter_fn: Any = None) -> LayerBits:
    """Pass 1: per-layer HPTQ target bits for ``config.target_bits`` on average (module
    docstring). ``config`` must be an HPTQ ``babai_config`` (``clip='hptq'``)."""
    if getattr(config, "clip", None) != "hptq" or config.target_bits is None:
        raise BabaiError("bit allocation spreads an HPTQ budget: pass babai_config("
                         "clip='hptq', target_bits=...)")
    budget = float(config.target_bits)
    t0 = time.perf_counter()
    accs = layer_hessians(model, calibration, batch_size=batch_size, blocks=blocks)
    path, stack = decoder_blocks(model, blocks)
    modules = {f"{path}.{i}.{n}": m for i, b in enumerate(stack)
               for n, m in b.named_modules() if is_quantizable(m)}
    if filter_fn is not None:
        modules = {n: m for n, m in modules.items() if filter_fn(m, n)}
    t1 = time.perf_counter()
    sens = output_sensitivities(model, calibration, windows=fisher_windows,
                                batch_size=max(1, min(batch_size, 4)), blocks=blocks)
    t2 = time.perf_counter()
    weights = {n: weight_matrix(m).detach() for n, m in modules.items()}
    hess = {n: accs[n].hessian for n in modules}
    curves, extra = rate_curves(weights, hess, sens, budget, config.order, config.damp,
                                progress=progress)
    t3 = time.perf_counter()
    fine = [c.fine() for c in curves]
    alloc = allocate(fine, budget)
    bits = alloc.bits(fine)
    numel = [c.numel for c in fine]
    shift = budget - sum(b * n for b, n in zip(bits, numel)) / sum(numel)
    targets = {c.name: b + shift for c, b in zip(fine, bits)}
    layers = [LayerPoint(c.name, c.sensitivity, extra[c.name][0], targets[c.name], x,
                         extra[c.name][1])
              for c, x in zip(fine, alloc.log2_steps(fine))]
    return LayerBits(budget, alloc.lam, targets, layers,
                     {"hessians": t1 - t0, "fisher": t2 - t1, "curves": t3 - t2,
                      "allocate": time.perf_counter() - t3})


class PerLayerTargets:
    """A ``BabaiConfig`` whose HPTQ target bits differ per layer (``for_layer(name)``); every
    other attribute is the wrapped config's."""

    def __init__(self, config: Any, targets: dict[str, float]) -> None:
        self.config = config
        self.targets = targets

    def __getattr__(self, name: str) -> Any:
        return getattr(self.config, name)

    def for_layer(self, name: str) -> Any:
        if name not in self.targets:
            raise BabaiError(f"no allocated bits for {name}: allocate on the same model and "
                             "layers that are quantized")
        return dataclasses.replace(self.config, target_bits=self.targets[name])


def quantize_model_allocated(model: nn.Module, config: Any, calibration: Any, *,
                             mode: str = "sequential", batch_size: int = 8,
                             fisher_windows: int = 16, progress: bool = True,
                             blocks: str | None = None, filter_fn: Any = None,
                             **quantize_options: Any
                             ) -> tuple[QuantizationReport, LayerBits]:
    """Both passes: per-layer bits from one λ, then ``quantize_model`` hitting them; the
    other ``quantize_model`` options (``tune``, ``forward_dtype``, ``hessian_tiles``, …) go
    to the second pass; ``hessian_tiles`` also sets how the first pass forms its Hessians."""
    with tiling(quantize_options.get("hessian_tiles", True)):  # the λ pass's Hessians too
        bits = allocate_layer_bits(model, config, calibration, fisher_windows=fisher_windows,
                                   batch_size=batch_size, blocks=blocks, progress=progress,
                                   filter_fn=filter_fn)
    report = quantize_model(model, PerLayerTargets(config, bits.targets), calibration,
                            mode=mode, batch_size=batch_size, progress=progress,
                            blocks=blocks, filter_fn=filter_fn, **quantize_options)
    return report, bits
