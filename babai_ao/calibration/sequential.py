"""Sequential calibration: quantize a model block by block (GPTQ practice).

The blocks are the model's decoder or encoder layers (``discovery``); their linears are
``nn.Linear`` and GPT-2's ``Conv1D`` (``layers``). For each block ``b`` with inputs ``X_b``
(the outputs of blocks ``< b``), with ``H = Σ_t x_t x_tᵀ`` over non-padded tokens ``t`` only
(the calibration's attention mask, ``batches``):

- the block's linears are split into *stages*: linears that read the very same input tensor
  (q/k/v; gate/up), in the order the block runs them (found by one probe forward);
- ``mode="sequential"``: for each stage in turn, run the block on ``X_b`` up to that stage
  (the forward stops at the stage's first linear), accumulate ``H = XᵀX`` of its input,
  quantize its linears with ``quantize_weight`` and install them, so later stages see the
  quantized earlier ones; then ``X_{b+1}`` = outputs of the quantized block;
- ``mode="observe"``: one float forward of the block collects every stage's ``H`` and gives
  ``X_{b+1}`` (float), then all its linears are quantized: Hessians of the float model only,
  the same as torchao's observe/convert flow.

By default the stage forwards are one forward per batch, paused at each stage while it is
quantized (``babai_ao.calibration.lockstep``: the same Hessians and codes bit for bit, and
the block outputs come out of the same forwards). Where a block cannot run in lockstep (a
linear called twice, fused experts), each stage forward reruns the block from its input,
but a linear already quantized in this block is computed once per batch — in the first forward that reaches it — and its output is
replayed in the later forwards (``babai_ao.calibration.replay``): its input there is the same tensor value, so
the result is the same, and the block's linear FLOPs are spent once instead of once per
stage. A replayed output that was modified in place is recomputed instead.

Memory is one block's activations: inputs and outputs of all calibration windows, and up to
``REPLAY_BUDGET`` bytes of recorded outputs while the block is calibrated (lockstep: the
paused forwards' live activations instead, ``lockstep.LOCKSTEP_BUDGET``) — plus the model,
unless it is streamed (``stream=``: ``streaming.BlockStream`` reads each block only while it
is calibrated, then writes and frees it; a lean stream, the default, also uses the rerun
path with nothing recorded, so only one batch's forward temporaries come on top of the
block's inputs and outputs, which it keeps on disk: ``spill``). Hooks are always
removed; an interrupt (Ctrl-C) leaves the blocks already done quantized and the rest float.

Called on every rank of a ``torch.distributed`` process group, the calibration windows are
split across the ranks, each stage's Hessians are summed over them and its solves spread
(``babai_ao.calibration.distributed``), on the lockstep and the rerun path alike (lockstep:
between stages, while the rank's forwards are paused): the codes equal the single-process
run's.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from babai_ao.errors import BabaiError
from babai_ao.kernels import cpu_int4
from babai_ao.lattice.hessian import HessianAccumulator, tiling
from babai_ao.lattice.quantize import quantize_weight

from . import distributed, lockstep
from .batches import Batch, calibration_batches, model_forward, token_rows
from .blocks import (
    StopForward,
    block_signature,
    decoder_blocks,
    first_block_inputs,
    linear_stages,
    run_block,
)
from .coverage import float_parameters
from .distributed import hessian, reduce_hessians, solve_cost, solve_spread
from .experts import quantize_experts
from .layers import (
    in_features,
    install,
    is_conv1d,
    is_quantizable,
    quantized_weight_type,
    set_weight,
    weight_matrix,
)
from .replay import Replay
from .report import LayerReport, QuantizationReport
from .streaming import BlockStream
from .tuning import TuneSettings, tune_block

__all__ = ["QuantizationReport", "decoder_blocks", "install", "layer_hessians",
           "quantize_model"]

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
    for extra in ("block_size", "refine", "exact_offset", "search", "k"):
        if getattr(config, extra, None) is not None:
            kwargs[extra] = getattr(config, extra)
    return kwargs


def _collect(block: nn.Module, inputs: Sequence[tuple[torch.Tensor, tuple, dict]],
             masks: Sequence[torch.Tensor | None], stages: Sequence[list[str]], stop: bool,
             keep_outputs: bool, replay: Replay | None = None, outputs: Any = None
             ) -> tuple[dict[str, HessianAccumulator], Any]:
    """Run the block on every batch, accumulating ``H = Σ x xᵀ`` of each stage's input over
    the batch's non-padded tokens (``masks[i]``: batch ``i``'s attention mask, or ``None``).

    With ``stop`` (one stage only) the forward ends at that stage's first linear. With
    ``keep_outputs`` each batch's output is appended to ``outputs`` (a new list if ``None``;
    a stream's spill file, ``spill.SpillWriter``), which is returned.
    """
    modules = dict(block.named_modules())
    accs: dict[str, HessianAccumulator] = {}
    handles = []
    current: list[torch.Tensor | None] = [None]  # the running batch's mask

    def hook_for(name: str):
        def hook(_m: nn.Module, args: tuple) -> None:
            accs[name].add(token_rows(args[0].detach(), current[0]))
            if stop:
                raise StopForward
        return hook

    for stage in stages:
        lead = modules[stage[0]]
        accs[stage[0]] = hessian(in_features(lead), lead.weight.device)
        handles.append(lead.register_forward_pre_hook(hook_for(stage[0])))
    if outputs is None:
        outputs = []
    try:
        with torch.no_grad():
            for i, inp in enumerate(inputs):
                current[0] = masks[i]
                if replay is not None:
                    replay.batch = i
                out = run_block(block, inp)
                if keep_outputs and out is not None:
                    outputs.append(out)
    finally:
        for h in handles:
            h.remove()
    return reduce_hessians(accs), outputs  # summed over the ranks of a distributed run


@cpu_int4.exact_forwards()  # codes must not depend on the CPU kernel mode
def layer_hessians(model: nn.Module, calibration: Any, batch_size: int = 8,
                   blocks: str | None = None) -> dict[str, HessianAccumulator]:
    """``H = XᵀX`` of the input of every linear (``nn.Linear``, ``Conv1D``) in the blocks of
    the float model, over its non-padded tokens, from one forward pass per batch (up to the
    last block: no ``lm_head``). Linears that read the same tensor (q/k/v, gate/up) share
    one accumulator object."""
    path, stack = decoder_blocks(model, blocks)
    named = {f"{path}.{i}.{n}": m for i, b in enumerate(stack)
             for n, m in b.named_modules() if is_quantizable(m)}
    accs: dict[str, HessianAccumulator] = {}
    last: dict[str, torch.Tensor] = {}
    current: list[Batch] = []

    def hook_for(name: str):
        def hook(m: nn.Module, args: tuple) -> None:
            x = args[0]
            for other, xo in last.items():
                if xo is x:  # same input as an earlier linear: share its Hessian
                    accs.setdefault(name, accs[other])
                    return
            last[name] = x
            accs.setdefault(name, HessianAccumulator(in_features(m), device=m.weight.device))
            accs[name].add(token_rows(x.detach(), current[0].attention_mask))
        return hook

    def stop(*_: Any) -> None:
        raise StopForward

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in named.items()]
    handles.append(stack[-1].register_forward_hook(stop))
    try:
        with torch.no_grad():
            for batch in calibration_batches(calibration, batch_size):
                last.clear()
                current[:] = [batch]
                with contextlib.suppress(StopForward):
                    model_forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    missing = sorted(set(named) - set(accs))
    if missing:
        raise BabaiError(f"linears {missing} never ran on the calibration data")
    return {n: accs[n] for n in named}


def _quantize_stage(block: nn.Module, prefix: str, stage: Sequence[str],
                    acc: HessianAccumulator, qkwargs: dict[str, Any], config: Any = None,
                    hessians: dict[str, torch.Tensor] | None = None) -> list[LayerReport]:
    modules = dict(block.named_modules())
    if hessians is not None:  # kept for block tuning's recomputed certificates
        hessians.update(dict.fromkeys(stage, acc.hessian))
    rows = []
    # SSQR / HPTQ, or a config that builds every weight itself (``builds_tensors``: GGUF
    # K-quants, ``babai_ao.checkpoints.gguf_model``): its quantize_tensor makes the tensor
    no_clipping = qkwargs.get("clip") in NO_CLIPPING_FORMATS or bool(
        getattr(config, "builds_tensors", False))
    if no_clipping and not hasattr(config, "quantize_tensor"):
        raise BabaiError(f"clip={qkwargs['clip']!r} needs a babai_ao.babai_config(...) config "
                         "(its quantize_tensor builds the SSQR/HPTQ weight)")

    def layer_config(name: str) -> Any:  # per-layer targets (calibration.allocation)
        return config.for_layer(f"{prefix}.{name}") if hasattr(config, "for_layer") else config

    def solve(linear: nn.Module, name: str) -> Callable[[], tuple[Any, float]]:
        def job() -> tuple[Any, float]:
            t0 = time.perf_counter()
            w = weight_matrix(linear)  # W [out, in]: a Conv1D's stored weight transposed
            result = (layer_config(name).quantize_tensor(w, acc.hessian, w.dtype)
                      if no_clipping else quantize_weight(w, acc.hessian, **qkwargs))
            return result, time.perf_counter() - t0
        return job

    # distributed: each solve on its owner rank, the result broadcast to every rank
    results = solve_spread([(solve_cost(*weight_matrix(modules[n]).shape), solve(modules[n], n))
                            for n in stage], modules[stage[0]].weight.device)
    for name, (result, seconds) in zip(stage, results, strict=True):
        linear = modules[name]
        if no_clipping:  # SSQR / HPTQ: the config built the stored tensor
            set_weight(linear, result)
        else:
            install(linear, result)
        c = result.certificate
        if hasattr(layer_config(name), "applied_to"):  # a BabaiConfig: kept for save_pretrained
            layer_config(name).applied_to(linear)
        rows.append(LayerReport(
            name=f"{prefix}.{name}", trace_d=c.trace_d, error=c.error,
            error_undamped=c.error_undamped, bound=c.bound, clipped=c.clipped,
            bits_per_weight=c.bits_per_weight, seconds=seconds, tokens=acc.tokens))
    return rows


def _selected_stages(block: nn.Module, prefix: str, probed: tuple[list[list[str]], set[str]],
                     filter_fn: Callable[[nn.Module, str], bool] | None
                     ) -> tuple[list[list[str]], set[str]]:
    """The block's stages (``probed``: ``linear_stages``) with only the layers ``filter_fn``
    selects (``filter_fn(module, qualified name)``; ``None``: all); empty stages dropped."""
    stages, repeated = probed
    if filter_fn is not None:
        modules = dict(block.named_modules())
        stages = [[n for n in stage if filter_fn(modules[n], f"{prefix}.{n}")]
                  for stage in stages]
        stages = [stage for stage in stages if stage]
    return stages, repeated


def _calibrate_block(block: nn.Module, prefix: str,
                     inputs: Sequence[tuple[torch.Tensor, tuple, dict]],
                     masks: Sequence[torch.Tensor | None], mode: str, stages: list[list[str]],
                     repeated: set[str], qkwargs: dict[str, Any], config: Any, last: bool,
                     bar: Any, tune: tuple[nn.Module, TuneSettings] | None = None,
                     tuning_log: list[dict[str, Any]] | None = None,
                     fast: dict[str, Any] | None = None, lean: bool = False,
                     outputs: Any = None) -> tuple[list[LayerReport], Any]:
    """Quantize one block's stages; returns its report rows and its outputs (the next
    block's inputs; none after the last block). ``tune``: the block's float copy and the
    settings of block tuning (``tuning``), run once the codes are fixed. ``lean``: least
    activation memory — the rerun path with nothing recorded for replay (same codes).
    ``outputs``: where the rerun path's last forward appends the outputs (a stream's spill
    file); the other paths return a list."""
    rows: list[LayerReport] = []
    hessians: dict[str, torch.Tensor] | None = {} if tune is not None else None
    if mode == "observe":
        accs, outputs = _collect(block, inputs, masks, stages, stop=False,
                                 keep_outputs=not last and tune is None, outputs=outputs)
        for stage in stages:
            rows += _quantize_stage(block, prefix, stage, accs[stage[0]], qkwargs, config,
                                    hessians)
        rows += quantize_experts(block, prefix, inputs, qkwargs, masks=masks)
        if tune is None:
            return rows, outputs
    elif not lean and lockstep.usable(block, inputs, repeated):
        # one forward per batch, paused per stage; each stage's H summed over the ranks
        def quantize(stage: list[str], acc: HessianAccumulator) -> None:
            if bar is not None:
                bar.set_postfix_str(f"{prefix}.{stage[0]}")
            rows.extend(_quantize_stage(block, prefix, stage, acc, qkwargs, config, hessians))

        outputs = lockstep.calibrate_block(block, inputs, masks, stages, quantize,
                                           keep_outputs=not last and tune is None,
                                           **(fast or {}))
        if tune is None:
            return rows, outputs
    else:
        if fast:
            raise BabaiError(f"{prefix}: forward_dtype needs the lockstep "
                             "forwards, which this block cannot use (a linear called twice, "
                             "fused experts, inputs over lockstep.LOCKSTEP_BUDGET, or a lean "
                             "stream: BlockStream(lean=False) allows it): leave it unset")
        replay = Replay(budget=0 if lean else None)
        modules = dict(block.named_modules())
        try:
            for stage in stages:
                if bar is not None:
                    bar.set_postfix_str(f"{prefix}.{stage[0]}")
                accs, _ = _collect(block, inputs, masks, [stage], stop=stage[0] not in repeated,
                                   keep_outputs=False, replay=replay)
                rows += _quantize_stage(block, prefix, stage, accs[stage[0]], qkwargs, config,
                                        hessians)
                for name in stage:
                    if name not in repeated:
                        replay.watch(modules[name], name)
                replay.watch_modules(block)
            rows += quantize_experts(block, prefix, inputs, qkwargs, replay, masks=masks)
            if tune is None:
                if last:
                    return rows, []
                return rows, _collect(block, inputs, masks, [], stop=False, keep_outputs=True,
                                      replay=replay, outputs=outputs)[1]
        finally:
            replay.close()
    if bar is not None:
        bar.set_postfix_str(f"{prefix}: tuning")
    result = tune_block(block, tune[0], inputs, hessians, qkwargs["damp"], tune[1])
    if tuning_log is not None:
        tuning_log.append({"block": prefix, "mse_before": result.loss_before,
                           "mse_after": result.loss_after, "kept": result.kept})
    tuned = {f"{prefix}.{t.name}": t for t in result.layers}
    for r in rows:
        if r.name in tuned:
            t = tuned[r.name]
            r.error, r.error_undamped, r.error_babai = t.error, t.error_undamped, t.error_babai
    return rows, [] if last else result.outputs


@cpu_int4.exact_forwards()  # codes must not depend on the CPU kernel mode
def quantize_model(model: nn.Module, config: Any, calibration: Any, *, mode: str = "sequential",
                   batch_size: int = 8, progress: bool = True, blocks: str | None = None,
                   filter_fn: Callable[[nn.Module, str], bool] | None = None,
                   stream: BlockStream | None = None, tune: TuneSettings | None = None,
                   forward_dtype: torch.dtype | None = None, hessian_tiles: bool = True,
                   hessian_reduce: str = "ordered") -> QuantizationReport:
    """Quantize every ``nn.Linear`` and ``Conv1D`` in the blocks of ``model`` in place, and
    every fused MoE experts module (per-expert Hessians of the routed tokens: ``experts``).

    ``config``: a ``BabaiConfig`` (or any object with ``bits, group_size, symmetric, order,
    clip, damp``). ``calibration``: token ids ``[n, seq_len]`` (``calibration_windows``), a
    dict with ``input_ids`` and ``attention_mask`` (a padded tokenizer output; padded tokens
    stay out of every Hessian), or an iterable of such batches. ``mode``: ``"sequential"``
    (each block calibrated on the outputs of the quantized blocks before it, stages in run
    order) or ``"observe"`` (Hessians of the float model). ``blocks``: attribute path of the
    block list (``"bert.encoder.layer"``; ``None``: found, ``discovery.find_blocks``).
    ``filter_fn(module, name)``: which layers to quantize (``None``: all in the blocks).
    ``stream``: a ``streaming.BlockStream`` for a model built on the meta device
    (``streaming.empty_model``): each block is read from the checkpoint, quantized, handed to
    the stream's sink and freed; with a saved state the run resumes after its last block.
    A lean stream (the default) calibrates with the rerun path and no replay recordings
    (least activation memory; same codes, more forward work).
    ``tune``: ``TuneSettings(steps=…)`` tunes each block's scales, norms and biases to its
    float outputs once its codes are fixed (``babai_ao.calibration.tuning``; codes and bits
    unchanged; ``None`` or ``steps=0``: off).
    ``hessian_tiles`` (default ``True``): only each Hessian's upper tiles are computed,
    then mirrored (``lattice.hessian``; ``False``: plain ``xᵀx`` products, other rounding).
    Opt-in speed-up of sequential mode that changes the arithmetic (``lockstep``):
    ``forward_dtype=torch.bfloat16`` (calibration forwards in bf16, Hessians in float32).
    Returns the per-layer report, with every parameter left in float listed.

    Inside a ``torch.distributed`` process group, call it on every rank with the same
    arguments: each rank calibrates its share of the batches and all end with the same
    quantized model and report (``distributed``; ``hessian_reduce``: ``"ordered"``, codes
    bit-identical to one process, or ``"sum"``, one fp64 all-reduce per Hessian).
    """
    if mode not in MODES:
        raise BabaiError(f"mode={mode!r}: choose one of {MODES}")
    if batch_size <= 0:
        raise BabaiError(f"batch_size={batch_size} must be positive")
    if forward_dtype == torch.float32:
        forward_dtype = None  # the installed weights' own forward
    fast = {"forward_dtype": forward_dtype} if forward_dtype is not None else {}
    if fast and mode != "sequential":
        raise BabaiError(f"forward_dtype applies to mode='sequential' only, not "
                         f"{mode!r}: leave it unset")
    if forward_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
        raise BabaiError(f"forward_dtype={forward_dtype}: choose torch.bfloat16 (or None)")
    qkwargs = _config_kwargs(config)
    path, stack = decoder_blocks(model, blocks)
    for name, m in model.named_modules():
        if is_quantizable(m) and quantized_weight_type(m) is not None:
            raise BabaiError(f"{name} already holds a {quantized_weight_type(m).__name__} "
                             "weight: quantize_model needs a float model (load it again)")
    if qkwargs["clip"] == "hptq" and any(is_conv1d(m) for m in stack.modules()):
        raise BabaiError("clip='hptq' weights cannot be stored transposed, as GPT-2's Conv1D "
                         "needs: use clip='ssqr' (or True/False) for this model")
    batches, shared = distributed.start(calibration_batches(calibration, batch_size),
                                        hessian_reduce)  # this rank's share
    masks = [b.attention_mask for b in batches]
    report = QuantizationReport(mode=mode)
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    bar = None
    scope = contextlib.ExitStack()
    scope.enter_context(tiling(hessian_tiles))  # every accumulator of this run
    try:
        with torch.no_grad():
            start, done = 0, []
            if stream is None:
                inputs = first_block_inputs(model, stack[0], batches)
            else:
                start, inputs, done = stream.begin(
                    model, path, stack, batches, {**qkwargs, "mode": mode,
                                                  "batch_size": batch_size},
                    lambda: first_block_inputs(model, stack[0], batches))
        report.rows += [LayerReport(**r) for r in done]
        steps: Iterable[int] = range(start, len(stack))
        if progress and distributed.is_lead():
            from tqdm.auto import tqdm

            bar = tqdm(steps, desc=f"quantize ({mode})", unit="block", initial=start,
                       total=len(stack))
            steps = bar
        probe: tuple[tuple, tuple[list[list[str]], set[str]]] | None = None
        for b in steps:
            prefix = f"{path}.{b}"
            if stream is not None:
                stream.load_block(b)
            signature = block_signature(stack[b])
            if probe is None or probe[0] != signature:  # a block unlike the one before
                probe = (signature, linear_stages(stack[b], inputs[0]))
            stages, repeated = _selected_stages(stack[b], prefix, probe[1], filter_fn)
            reference = copy.deepcopy(stack[b]) if tune is not None and tune.steps else None
            rows, outputs = _calibrate_block(stack[b], prefix, inputs, masks, mode, stages,
                                             repeated, qkwargs, config,
                                             last=b == len(stack) - 1, bar=bar,
                                             tune=None if reference is None else (reference, tune),
                                             tuning_log=report.tuning, fast=fast,
                                             lean=stream is not None and stream.lean,
                                             outputs=None if stream is None else
                                             stream.outputs(b))
            del reference
            report.rows += rows
            if stream is None:
                inputs = [(out, inp[1], inp[2]) for out, inp in zip(outputs, inputs)]
            else:  # on disk when the stream spills (the block's input file deleted)
                inputs = stream.next_inputs(outputs, inputs)
            del outputs
            if stream is not None:
                stream.finish_block(b, [asdict(r) for r in report.rows], inputs)
    finally:
        if stream is not None:
            stream.close()  # spilled activations removed, also on errors and Ctrl-C
        if bar is not None:
            bar.close()
        model.train(was_training)
        report.float_parameters, report.quantized_parameters = float_parameters(
            model, [f"{r.name}.weight" for r in report.rows], path)
        report.seconds = time.perf_counter() - t0
        distributed.stop(shared)
        scope.close()
    return report
