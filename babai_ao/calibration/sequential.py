"""Sequential calibration: quantize a decoder model block by block (GPTQ practice).

For each decoder block ``b`` with inputs ``X_b`` (the outputs of blocks ``< b``):

- the block's linears are split into *stages*: linears that read the very same input tensor
  (q/k/v; gate/up), in the order the block runs them (found by one probe forward);
- ``mode="sequential"``: for each stage in turn, run the block on ``X_b`` up to that stage
  (the forward stops at the stage's first linear), accumulate ``H = XᵀX`` of its input,
  quantize its linears with ``quantize_weight`` and install them, so later stages see the
  quantized earlier ones; then ``X_{b+1}`` = outputs of the quantized block;
- ``mode="observe"``: one float forward of the block collects every stage's ``H`` and gives
  ``X_{b+1}`` (float), then all its linears are quantized: Hessians of the float model only,
  the same as torchao's observe/convert flow.

Each stage forward reruns the block from its input, but a linear already quantized in this
block is computed once per batch — in the first forward that reaches it — and its output is
replayed in the later forwards (``babai_ao.calibration.replay``): its input there is the same tensor value, so
the result is the same, and the block's linear FLOPs are spent once instead of once per
stage. A replayed output that was modified in place is recomputed instead.

Memory is one block's activations: inputs and outputs of all calibration windows, and up to
``REPLAY_BUDGET`` bytes of recorded outputs while the block is calibrated. Hooks are always
removed; an interrupt (Ctrl-C) leaves the blocks already done quantized and the rest float.
"""

from __future__ import annotations

import importlib.util
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from babai_ao.errors import BabaiError
from babai_ao.lattice.hessian import HessianAccumulator
from babai_ao.lattice.quantize import QuantizedWeight, quantize_weight

from .blocks import (
    StopForward,
    calibration_batches,
    decoder_blocks,
    first_block_inputs,
    linear_stages,
    run_block,
)
from .replay import Replay
from .report import LayerReport, QuantizationReport

MODES = ("sequential", "observe")
NO_CLIPPING_FORMATS = ("ssqr", "hptq")  # built by config.quantize_tensor
CONFIG_FIELDS = ("bits", "group_size", "symmetric", "order", "clip", "damp")


def _config_kwargs(config: Any) -> dict[str, Any]:
    missing = [f for f in CONFIG_FIELDS if not hasattr(config, f)]
    if missing:
        raise BabaiError(f"config {type(config).__name__} lacks {missing}: pass "
                         "babai_ao.babai_config(...) (or any object with "
                         f"{', '.join(CONFIG_FIELDS)})")
    kwargs = {f: getattr(config, f) for f in CONFIG_FIELDS}
    for extra in ("block_size", "refine", "exact_offset"):
        if getattr(config, extra, None) is not None:
            kwargs[extra] = getattr(config, extra)
    return kwargs


def _collect(block: nn.Module, inputs: Sequence[tuple[torch.Tensor, tuple, dict]],
             stages: Sequence[list[str]], stop: bool, keep_outputs: bool,
             replay: Replay | None = None
             ) -> tuple[dict[str, HessianAccumulator], list[torch.Tensor]]:
    """Run the block on every batch, accumulating ``H`` of each stage's input.

    With ``stop`` (one stage only) the forward ends at that stage's first linear.
    """
    modules = dict(block.named_modules())
    accs: dict[str, HessianAccumulator] = {}
    handles = []

    def hook_for(name: str):
        def hook(_m: nn.Module, args: tuple) -> None:
            accs[name].add(args[0].detach())
            if stop:
                raise StopForward
        return hook

    for stage in stages:
        lead = modules[stage[0]]
        accs[stage[0]] = HessianAccumulator(lead.in_features, device=lead.weight.device)
        handles.append(lead.register_forward_pre_hook(hook_for(stage[0])))
    outputs: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for i, inp in enumerate(inputs):
                if replay is not None:
                    replay.batch = i
                out = run_block(block, inp)
                if keep_outputs and out is not None:
                    outputs.append(out)
    finally:
        for h in handles:
            h.remove()
    return accs, outputs


def layer_hessians(model: nn.Module, calibration: Any, batch_size: int = 8
                   ) -> dict[str, HessianAccumulator]:
    """``H = XᵀX`` of the input of every decoder ``nn.Linear`` of the float model, from one
    forward pass per batch (the decoder only, no ``lm_head``). Linears that read the same
    tensor (q/k/v, gate/up) share one accumulator object."""
    path, blocks = decoder_blocks(model)
    named = {f"{path}.{i}.{n}": m for i, b in enumerate(blocks)
             for n, m in b.named_modules() if isinstance(m, nn.Linear)}
    accs: dict[str, HessianAccumulator] = {}
    last: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(m: nn.Module, args: tuple) -> None:
            x = args[0]
            for other, xo in last.items():
                if xo is x:  # same input as an earlier linear: share its Hessian
                    accs.setdefault(name, accs[other])
                    return
            last[name] = x
            accs.setdefault(name, HessianAccumulator(m.in_features, device=m.weight.device))
            accs[name].add(x.detach())
        return hook

    body = model.get_decoder() if hasattr(model, "get_decoder") else model
    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in named.items()]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for ids in calibration_batches(calibration, batch_size):
                last.clear()
                body(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    missing = sorted(set(named) - set(accs))
    if missing:
        raise BabaiError(f"linears {missing} never ran on the calibration data")
    return {n: accs[n] for n in named}


def install(linear: nn.Linear, qw: QuantizedWeight) -> None:
    """Replace ``linear.weight`` by a ``BabaiQuantizedTensor`` holding ``qw``.

    Codes outside ``[0, 2^b − 1]`` (``clip=False``) do not fit a ``b``-bit tensor: then the
    dequantized values are written into the float weight (warned once), which keeps the
    model's outputs and the certificate exact; store such weights with ``clip='ssqr'``.
    """
    dtype = linear.weight.dtype
    bits = qw.grid.bits
    fits = qw.codes.numel() == 0 or (int(qw.codes.min()) >= 0 and
                                     int(qw.codes.max()) <= 2**bits - 1)
    if not fits or importlib.util.find_spec("torchao") is None:
        if not fits:
            warnings.warn(f"clip=False codes leave the {bits}-bit range: installing "
                          "dequantized float weights (use clip='ssqr' to store them packed)",
                          stacklevel=3)
        with torch.no_grad():
            linear.weight.copy_(qw.dequantize(dtype))
        return
    from babai_ao.ao.tensor import BabaiQuantizedTensor

    tensor = BabaiQuantizedTensor.from_quantized(qw, dtype)
    linear.weight = nn.Parameter(tensor, requires_grad=False)


def _quantize_stage(block: nn.Module, prefix: str, stage: Sequence[str],
                    acc: HessianAccumulator, qkwargs: dict[str, Any], config: Any = None
                    ) -> list[LayerReport]:
    modules = dict(block.named_modules())
    rows = []
    no_clipping = qkwargs.get("clip") in NO_CLIPPING_FORMATS
    if no_clipping and not hasattr(config, "quantize_tensor"):
        raise BabaiError(f"clip={qkwargs['clip']!r} needs a babai_ao.babai_config(...) config "
                         "(its quantize_tensor builds the SSQR/HPTQ weight)")
    for name in stage:
        linear = modules[name]
        t0 = time.perf_counter()
        if no_clipping:  # SSQR / HPTQ: the config builds the stored tensor
            w = linear.weight.detach()
            tensor = config.quantize_tensor(w, acc.hessian, w.dtype)
            linear.weight = nn.Parameter(tensor, requires_grad=False)
            c = tensor.certificate
        else:
            qw = quantize_weight(linear.weight.detach(), acc.hessian, **qkwargs)
            install(linear, qw)
            c = qw.certificate
        if hasattr(config, "applied_to"):  # a BabaiConfig: remembered for save_pretrained
            config.applied_to(linear)
        rows.append(LayerReport(
            name=f"{prefix}.{name}", trace_d=c.trace_d, error=c.error,
            error_undamped=c.error_undamped, bound=c.bound, clipped=c.clipped,
            bits_per_weight=c.bits_per_weight, seconds=time.perf_counter() - t0,
            tokens=acc.tokens))
    return rows


def quantize_model(model: nn.Module, config: Any, calibration: Any, *, mode: str = "sequential",
                   batch_size: int = 8, progress: bool = True) -> QuantizationReport:
    """Quantize every ``nn.Linear`` in the decoder blocks of ``model`` in place.

    ``config``: a ``BabaiConfig`` (or any object with ``bits, group_size, symmetric, order,
    clip, damp``). ``calibration``: token ids ``[n, seq_len]`` (``calibration_windows``) or
    an iterable of id batches. ``mode``: ``"sequential"`` (each block calibrated on the
    outputs of the quantized blocks before it, stages in run order) or ``"observe"``
    (Hessians of the float model). Returns the per-layer report.
    """
    if mode not in MODES:
        raise BabaiError(f"mode={mode!r}: choose one of {MODES}")
    if batch_size <= 0:
        raise BabaiError(f"batch_size={batch_size} must be positive")
    qkwargs = _config_kwargs(config)
    path, blocks = decoder_blocks(model)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and type(m.weight.detach()) is not torch.Tensor:
            raise BabaiError(f"{name} already holds a {type(m.weight.detach()).__name__} weight: "
                             "quantize_model needs a float model (load it again)")
    batches = calibration_batches(calibration, batch_size)
    report = QuantizationReport(mode=mode)
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    bar = None
    try:
        with torch.no_grad():
            inputs = first_block_inputs(model, blocks[0], batches)
        steps: Iterable[int] = range(len(blocks))
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(steps, desc=f"quantize ({mode})", unit="block")
            steps = bar
        for b in steps:
            block = blocks[b]
            prefix = f"{path}.{b}"
            last = b == len(blocks) - 1
            stages, repeated = linear_stages(block, inputs[0])
            if mode == "observe":
                accs, outputs = _collect(block, inputs, stages, stop=False, keep_outputs=not last)
                for stage in stages:
                    report.rows += _quantize_stage(block, prefix, stage, accs[stage[0]], qkwargs,
                                                  config)
            else:
                replay = Replay()
                modules = dict(block.named_modules())
                try:
                    for stage in stages:
                        if bar is not None:
                            bar.set_postfix_str(f"{prefix}.{stage[0]}")
                        accs, _ = _collect(block, inputs, [stage],
                                           stop=stage[0] not in repeated, keep_outputs=False,
                                           replay=replay)
                        report.rows += _quantize_stage(block, prefix, stage, accs[stage[0]],
                                                      qkwargs, config)
                        for name in stage:
                            if name not in repeated:
                                replay.watch(modules[name], name)
                        replay.watch_modules(block)
                    outputs = [] if last else _collect(block, inputs, [], stop=False,
                                                       keep_outputs=True, replay=replay)[1]
                finally:
                    replay.close()
            inputs = [(out, inp[1], inp[2]) for out, inp in zip(outputs, inputs)]
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
        report.seconds = time.perf_counter() - start
    return report
