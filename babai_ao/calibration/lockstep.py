"""Lockstep stage forwards: each calibration batch runs through a block once, pausing at stages.

Sequential calibration needs, for stage ``s`` of a block (q/k/v, o, gate/up, down), the
Hessian ``H_s = Σ_t x_t x_tᵀ`` of the stage's input with stages ``< s`` already quantized.
Rerunning the block from its input for every stage (``sequential._collect`` with ``replay``)
repeats work: attention and the linears that feed a later stage are recomputed. Here every
batch's block forward runs once, in its own thread, and stops in a forward pre-hook on the
first linear of each stage, after adding the stage input to ``H_s``. When every batch waits
at stage ``s``, the stage is quantized and installed; the forwards then go on and read the
quantized weights (a linear reads ``self.weight`` after its pre-hooks), exactly as a rerun
from the block input would. The last stage's forwards run on to the block output: the next
block's input, with no extra forward.

Once a stage is installed, the paused forwards compute its linears as ``F.linear`` with a
dense copy of the dequantized weight (``_dense_forward``), made once per block instead of
dequantizing (and, for act-order codes, permuting the input) in every call; the values are
the installed weight's, and ``F.linear(x, W̃)`` is what its exact kernel computes.

Each batch computes the same operations on the same values as the rerun path, and the
controller resumes the forwards one at a time in batch order, so every ``H_s`` sums the same
products in the same order: the Hessians, codes and block outputs are bit-identical to the
rerun path (``LOCKSTEP = False``). The threads are paused call stacks, not parallelism:
only one runs at a time (torch's own intra-op threads do the arithmetic).

In a ``torch.distributed`` calibration (``distributed``) each rank runs its own batches in
lockstep. The controller — the thread that called ``quantize_model``, never a paused
forward — reduces stage ``s``'s Hessian over the ranks (``distributed.reduce_hessians``)
once its own forwards all wait at ``s``, then quantizes the stage (solves spread,
``distributed.solve_spread``): one reduction and one stage's solves per stage, in stage
order, on every rank, whatever its number of batches or tokens. Those are the collectives
the rerun path makes for the same block, with the same partial sums, so a rank whose
inputs exceed the budget below (it uses the rerun path) still matches ranks that do not.

Opt-in speed-ups that change the arithmetic (so codes may differ from the rerun path):
``forward_dtype=torch.bfloat16`` runs the forwards under autocast, each quantized linear as a
dense ``bfloat16`` copy of its dequantized weight (the installed weight is unchanged), while
every Hessian is still accumulated in float32 from those bf16 activations. (Hessians are
accumulated tile-wise by default on every path, ``lattice.hessian.tiling``.)

Memory: while paused, every batch keeps its forward's live activations (for a Llama block
about five hidden-size tensors per token at the ``down`` stage); blocks whose inputs exceed
``LOCKSTEP_BUDGET / 8`` bytes use the rerun path. Linears called twice in one forward (their
Hessian sums every call) and fused MoE experts (calibrated after the block's linears) also
keep the rerun path.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch
from torch import nn

from babai_ao.ao.experts import fused_experts
from babai_ao.errors import BabaiError
from babai_ao.lattice.hessian import HessianAccumulator

from .batches import token_rows
from .blocks import StopForward, run_block
from .distributed import hessian, reduce_hessians
from .layers import in_features

LOCKSTEP = True  # tests turn it off to compare against the rerun path
LOCKSTEP_BUDGET = 8 * 2**30  # bytes: 8 × a block's input tensors must fit (SmolLM2 P1: 1.2 GB)
BLOCKS_RUN = 0  # blocks calibrated in lockstep by this process (tests check the path taken)

Inputs = Sequence[tuple[torch.Tensor, tuple, dict]]


def usable(block: nn.Module, inputs: Inputs, repeated: set[str]) -> bool:
    """Whether ``block`` can be calibrated in lockstep (module docstring: else rerun)."""
    size = sum(h.numel() * h.element_size() for h, _, _ in inputs)
    return LOCKSTEP and not repeated and not fused_experts(block) and 8 * size <= LOCKSTEP_BUDGET


class _Forward(threading.Thread):
    """One batch's block forward, run in steps: it waits on ``resume`` at each stage."""

    def __init__(self, block: nn.Module, inp: tuple[torch.Tensor, tuple, dict],
                 mask: torch.Tensor | None, paused: threading.Semaphore,
                 dtype: torch.dtype | None) -> None:
        super().__init__(daemon=True)
        self.block, self.inp, self.mask, self.dtype = block, inp, mask, dtype
        self.paused, self.resume = paused, threading.Semaphore(0)
        self.at: int | None = None  # the stage it waits at; None: finished
        self.abort = False
        self.output: torch.Tensor | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with torch.no_grad(), torch.autocast(  # grad and autocast modes are per thread
                    self.inp[0].device.type, dtype=self.dtype, enabled=self.dtype is not None):
                out = run_block(self.block, self.inp)
            self.output = None if out is None else out.to(self.inp[0].dtype)
        except BaseException as e:  # handed to the controller
            self.error = e
        finally:
            self.at = None
            self.paused.release()

    def wait_at(self, stage: int) -> None:
        """Called in this thread by the stage's hook: hand control back, wait to resume."""
        self.at = stage
        self.paused.release()
        self.resume.acquire()
        if self.abort:
            raise StopForward


def _float_dtype(linear: nn.Module) -> torch.dtype:
    """The dtype ``linear`` computes in: its dequantized weight's."""
    w = linear.weight.detach()
    return getattr(w, "dtype", torch.float32)


def _dense_forward(linear: nn.Module, dtype: torch.dtype) -> None:
    """From now on ``linear`` computes ``x W̃ᵀ + b`` with its dequantized weight ``W̃`` held
    densely in ``dtype`` (until ``del linear.forward``)."""
    w = linear.weight.detach()
    w = (w.dequantize() if type(w) is not torch.Tensor else w).to(dtype)
    b = None if linear.bias is None else linear.bias.detach().to(dtype)
    linear.forward = lambda x: nn.functional.linear(x.to(dtype), w, b)


def calibrate_block(block: nn.Module, inputs: Inputs, masks: Sequence[torch.Tensor | None],
                    stages: Sequence[list[str]],
                    quantize: Callable[[list[str], HessianAccumulator], None],
                    keep_outputs: bool, forward_dtype: torch.dtype | None = None
                    ) -> list[torch.Tensor]:
    """Run every batch through ``block`` once, calling ``quantize(stage, H)`` when all
    batches have reached the stage (``H`` summed over the ranks of a distributed
    calibration); returns the block outputs (none if not ``keep_outputs``).
    ``forward_dtype``: the opt-in speed-up of the module docstring.
    """
    global BLOCKS_RUN
    modules = dict(block.named_modules())
    accs = []
    for stage in stages:  # created here, on the controller: it holds the distributed group
        k = in_features(modules[stage[0]])
        accs.append(hessian(k, modules[stage[0]].weight.device))
    paused = threading.Semaphore(0)
    forwards = [_Forward(block, inp, mask, paused, forward_dtype)
                for inp, mask in zip(inputs, masks)]
    dense: list[nn.Module] = []

    def hook_for(s: int):
        def hook(_m: nn.Module, args: tuple) -> None:
            fwd = threading.current_thread()
            if not isinstance(fwd, _Forward) or fwd.block is not block:
                return  # the block called from elsewhere, not by one of these forwards
            accs[s].add(token_rows(args[0].detach(), fwd.mask))
            fwd.wait_at(s)
        return hook

    def step(fwd: _Forward, started: bool) -> None:
        if started:
            fwd.resume.release()
        else:
            fwd.start()
        paused.acquire()
        if fwd.error is not None:
            raise fwd.error

    handles = [modules[s[0]].register_forward_pre_hook(hook_for(i))
               for i, s in enumerate(stages)]
    started: set[int] = set()
    try:
        for s, stage in enumerate(stages):
            for i, fwd in enumerate(forwards):
                step(fwd, i in started)
                started.add(i)
                if fwd.at != s:
                    where = "finished" if fwd.at is None else f"stopped at {stages[fwd.at][0]}"
                    raise BabaiError(f"batch {i} {where} before reaching {stage[0]}: the block "
                                     "runs its linears in a data-dependent order; set "
                                     "babai_ao.calibration.lockstep.LOCKSTEP = False")
            # every forward of this rank is paused: reduce over the ranks (a no-op in one
            # process) on this thread, in stage order, then quantize
            quantize(stage, reduce_hessians([accs[s]])[0])
            for name in stage:  # the rest of the block's forwards: dense dequantized copies
                if isinstance(modules[name], nn.Linear):
                    _dense_forward(modules[name], forward_dtype or _float_dtype(modules[name]))
                    dense.append(modules[name])
        BLOCKS_RUN += 1
        if not keep_outputs:
            return []
        for i, fwd in enumerate(forwards):
            step(fwd, i in started)
            if fwd.at is not None:
                raise BabaiError(f"batch {i} stopped twice at {stages[fwd.at][0]}")
        return [fwd.output for fwd in forwards]
    finally:
        for h in handles:
            h.remove()
        for fwd in forwards:
            if fwd.is_alive():
                fwd.abort = True
                fwd.resume.release()
                fwd.join()
        for linear in dense:
            del linear.forward  # back to the class's forward (the installed weight)
