"""Sequential calibration of fused MoE experts: one Hessian per expert, from its routed tokens.

A fused experts module (transformers 5: ``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I],
called as ``experts(hidden_states, top_k_index, top_k_weights)``) holds 2·E linear maps. Expert
``e``'s ``gate_up`` map only ever sees the tokens the router sends it, so its lattice is
``H_gu[e] = Σ_{t → e} x_t x_tᵀ`` over exactly those tokens (padded positions of the
calibration's attention mask left out, as for every other linear); its ``down`` map sees their
intermediate activations ``h_t = act(g_t) ⊙ u_t`` with ``[g_t; u_t] = W̃_gu[e] x_t`` computed
from the already-quantized ``W̃_gu[e]`` (the sequential order: ``gate_up`` of every expert first,
then ``down``), so ``H_down[e] = Σ_{t → e} h_t h_tᵀ``. Routing weights scale an expert's output
after ``down`` and do not enter the Hessians (plain ``XᵀX`` of the routed inputs).

An expert that no calibration token reached has no Hessian: it is rounded to nearest on the
same grid (``H = I``), named in a warning and reported with ``tokens = 0`` (or refused with
``strict=True``). The router stays float. When a block is done its experts module is replaced
by ``babai_ao.ao.experts.BabaiExperts`` (packed codes, one custom op).

In a distributed calibration each expert's ``H`` is summed over the ranks (every rank takes
part for every expert, also one that no token of its own reached) and the experts' solves
are spread over the ranks by cost (``distributed``).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from babai_ao.ao.experts import CONFIG_KEY, BabaiExperts, fused_experts
from babai_ao.errors import BabaiError
from babai_ao.lattice.hessian import HessianAccumulator
from babai_ao.lattice.quantize import QuantizedWeight, quantize_weight

from .blocks import StopForward, run_block
from .distributed import hessian, reduce_hessians, solve_cost, solve_spread
from .report import LayerReport


def routed_tokens(top_k_index: torch.Tensor, expert: int) -> torch.Tensor:
    """Rows of the flattened tokens that the router sent to ``expert`` (any of the top k)."""
    index = top_k_index.reshape(-1, top_k_index.shape[-1])
    return torch.where((index == expert).any(dim=-1))[0]


def _intermediate(module: nn.Module, x: torch.Tensor, expert: int) -> torch.Tensor:
    gate, up = nn.functional.linear(x, module.gate_up_proj[expert]).chunk(2, dim=-1)
    return module.act_fn(gate) * up


def collect(block: nn.Module, module: nn.Module, part: str,
            inputs: Sequence[tuple[torch.Tensor, tuple, dict]], replay: Any = None,
            masks: Sequence[torch.Tensor | None] | None = None) -> list[HessianAccumulator]:
    """Run the block on every batch up to ``module`` and accumulate each expert's ``H`` of
    ``part`` (``gate_up``: routed hidden states; ``down``: their intermediate activations)
    over the batch's non-padded tokens (``masks[i]``: batch ``i``'s attention mask)."""
    num = module.gate_up_proj.shape[0]
    width = module.gate_up_proj.shape[2] if part == "gate_up" else module.down_proj.shape[2]
    device = module.gate_up_proj.device
    accs = [hessian(width, device) for _ in range(num)]
    current: list[torch.Tensor | None] = [None]  # the running batch's flattened mask

    def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        names = ("hidden_states", "top_k_index", "top_k_weights")
        values = dict(zip(names, args, strict=False)) | {k: kwargs[k] for k in names
                                                         if k in kwargs}
        x = values["hidden_states"].detach().reshape(-1, module.gate_up_proj.shape[2])
        keep = current[0]
        if keep is not None and keep.numel() != x.shape[0]:
            raise BabaiError(f"the experts' input has {x.shape[0]} tokens but the attention "
                             f"mask {keep.numel()}, so padded tokens cannot be left out of "
                             "the expert Hessians: calibrate without padding")
        for e in range(num):
            rows = routed_tokens(values["top_k_index"], e)
            if keep is not None:
                rows = rows[keep.to(rows.device)[rows]]
            if rows.numel():
                xe = x.index_select(0, rows)
                accs[e].add(xe if part == "gate_up" else _intermediate(module, xe, e))
        raise StopForward

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for i, inp in enumerate(inputs):
                if replay is not None:
                    replay.batch = i
                mask = masks[i] if masks is not None else None
                current[0] = None if mask is None else mask.reshape(-1).bool()
                run_block(block, inp)
    finally:
        handle.remove()
    return reduce_hessians(accs)  # summed over the ranks of a distributed run


def quantize_experts(block: nn.Module, prefix: str,
                     inputs: Sequence[tuple[torch.Tensor, tuple, dict]],
                     qkwargs: dict[str, Any], replay: Any = None, strict: bool = False,
                     masks: Sequence[torch.Tensor | None] | None = None) -> list[LayerReport]:
    """Calibrate and quantize every fused experts module of ``block`` (module docstring);
    each is replaced by a ``BabaiExperts``. Returns one report row per expert weight.
    ``masks``: the batches' attention masks (padded tokens stay out of every Hessian)."""
    rows: list[LayerReport] = []
    for name, module in fused_experts(block).items():
        if qkwargs.get("clip") is not True:
            raise BabaiError(f"{prefix}.{name}: MoE experts are stored on the clipped grid only "
                             f"(clip=True), not clip={qkwargs.get('clip')!r}")
        act = getattr(getattr(module, "config", None), "hidden_act", None) or "silu"
        weights: dict[str, list[QuantizedWeight]] = {}
        for part in ("gate_up", "down"):
            accs = collect(block, module, part, inputs, replay, masks)
            param = getattr(module, f"{part}_proj")
            unrouted = [e for e, a in enumerate(accs) if a.tokens == 0]
            if unrouted:
                message = (f"{prefix}.{name}: experts {unrouted} received no calibration tokens"
                           f" ({part}); they are rounded to nearest on the grid (H = I)")
                if strict:
                    raise BabaiError(message + ": pass more calibration data")
                warnings.warn(message, UserWarning, stacklevel=3)
            weights[part] = []

            def solve(w: torch.Tensor, acc: HessianAccumulator):
                def job() -> tuple[QuantizedWeight, float]:
                    t0 = time.perf_counter()
                    h = acc.hessian if acc.tokens else None
                    qw = quantize_weight(w.detach().float(), h, **qkwargs)
                    return qw, time.perf_counter() - t0
                return job

            results = solve_spread([(solve_cost(*param.shape[1:]), solve(param[e], acc))
                                    for e, acc in enumerate(accs)], param.device)
            for e, (acc, (qw, seconds)) in enumerate(zip(accs, results, strict=True)):
                with torch.no_grad():  # later parts and stages see the quantized weight
                    param[e].copy_(qw.dequantize(param.dtype))
                weights[part].append(qw)
                c = qw.certificate
                rows.append(LayerReport(
                    name=f"{prefix}.{name}.{part}_proj[{e}]", trace_d=c.trace_d, error=c.error,
                    error_undamped=c.error_undamped, bound=c.bound, clipped=c.clipped,
                    bits_per_weight=c.bits_per_weight, seconds=seconds, tokens=acc.tokens))
        packed = BabaiExperts.from_quantized(weights["gate_up"], weights["down"], act,
                                             module.gate_up_proj.dtype)
        packed.to(module.gate_up_proj.device)
        parent, _, child = f"{name}".rpartition(".")
        setattr(block.get_submodule(parent) if parent else block, child, packed)
        config = getattr(module, "config", None)  # the model's config (transformers sets it)
        if config is not None:  # config.json then says how to rebuild the experts at load
            setattr(config, CONFIG_KEY, packed.spec())
    return rows
