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
replayed in the later forwards (``_Replay``): its input there is the same tensor value, so
the result is the same, and the block's linear FLOPs are spent once instead of once per
stage. A replayed output that was modified in place is recomputed instead.

Memory is one block's activations: inputs and outputs of all calibration windows, and up to
``REPLAY_BUDGET`` bytes of recorded outputs while the block is calibrated. Hooks are always
removed; an interrupt (Ctrl-C) leaves the blocks already done quantized and the rest float.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from .errors import BabaiError
from .hessian import HessianAccumulator
from .quantize import QuantizedWeight, quantize_weight

MODES = ("sequential", "observe")
NO_CLIPPING_FORMATS = ("ssqr", "hptq")  # built by config.quantize_tensor
CONFIG_FIELDS = ("bits", "group_size", "symmetric", "order", "clip", "damp")
# attribute paths of the decoder block list, Llama family first
BLOCK_PATHS = ("model.layers", "model.decoder.layers", "gpt_neox.layers", "transformer.h")


class _Stop(Exception):
    """Raised inside a hook to end a forward early."""


REPLAY = True  # tests turn it off to compare against plain recomputation
REPLAY_BUDGET = 2 * 2**30  # bytes of recorded outputs per block (SmolLM2 at P1: ~1.1 GB)


def _nbytes(out: Any) -> int:
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(out)
               if isinstance(t, torch.Tensor))


def _versions(out: Any) -> tuple[int, ...]:
    """In-place-write counters of every tensor in a module output."""
    return tuple(t._version for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


class _Replay:
    """Outputs of a block's quantized linears, per calibration batch, replayed in the later
    stage forwards of the same block (``batch`` is set by ``_collect`` before each batch).

    Recordings stop at ``REPLAY_BUDGET`` bytes (the rest is recomputed, as without replay),
    and a linear's recordings are dropped once the module around it is replayed whole.
    """

    def __init__(self) -> None:
        self.batch = 0
        self.outputs: dict[str, dict[int, tuple[Any, tuple[int, ...]]]] = {}
        self.watched: set[str] = set()
        self.patched: list[nn.Module] = []
        self.nbytes = 0

    def watch(self, linear: nn.Linear, name: str) -> None:
        """From now on ``linear`` (quantized, called once per forward) records or replays."""
        if REPLAY:
            self._patch(linear, name)

    def watch_modules(self, block: nn.Module) -> None:
        """Also replay whole submodules (an attention module, an MLP) once every linear in
        them is quantized and watched: their output is then fixed too, and replaying it skips
        the non-linear work (attention) as well."""
        if not REPLAY:
            return
        for name, module in block.named_modules():
            if (not name or isinstance(module, nn.Linear) or name in self.watched
                    or any(name.startswith(w + ".") for w in self.watched)):
                continue
            inner = [f"{name}.{n}" for n, m in module.named_modules() if isinstance(m, nn.Linear)]
            if inner and all(n in self.watched for n in inner):
                self._patch(module, name)
                for n in inner:  # replayed whole from now on: their recordings are unused
                    self.nbytes -= sum(_nbytes(out) for out, _ in self.outputs[n].values())
                    self.outputs[n].clear()

    def _patch(self, module: nn.Module, name: str) -> None:
        compute = module.forward
        seen = self.outputs.setdefault(name, {})

        def forward(*args: Any, **kwargs: Any) -> Any:
            recorded = seen.get(self.batch)
            if recorded is not None and recorded[1] == _versions(recorded[0]):
                return recorded[0]  # untouched since recorded
            out = compute(*args, **kwargs)
            size = _nbytes(out)
            if recorded is not None:
                self.nbytes -= _nbytes(recorded[0])
                del seen[self.batch]
            if self.nbytes + size <= REPLAY_BUDGET:
                seen[self.batch] = (out, _versions(out))
                self.nbytes += size
            return out

        module.forward = forward
        self.patched.append(module)
        self.watched.add(name)

    def close(self) -> None:
        for module in self.patched:
            del module.forward  # back to the class's forward
        self.patched.clear()
        self.outputs.clear()
        self.watched.clear()
        self.nbytes = 0


@dataclass
class LayerReport:
    """One quantized linear: certificate numbers and solver time."""

    name: str
    trace_d: float
    error: float
    error_undamped: float
    bound: float
    clipped: int
    bits_per_weight: float
    seconds: float
    tokens: int

    @property
    def bound_holds(self) -> bool:
        return self.clipped == 0 and self.error <= self.bound * (1 + 1e-6)


@dataclass
class QuantizationReport:
    """Per-layer rows plus totals; ``seconds`` is the wall time of the whole call."""

    mode: str
    rows: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def solver_seconds(self) -> float:
        return sum(r.seconds for r in self.rows)

    def bound_checks(self) -> tuple[int, int]:
        """``(layers with E ≤ B, layers where the bound applies: nothing clipped)``."""
        applicable = [r for r in self.rows if r.clipped == 0]
        return sum(r.bound_holds for r in applicable), len(applicable)

    def to_csv(self, path: str | None = None) -> str:
        buf = io.StringIO()
        names = [f.name for f in fields(LayerReport)]
        writer = csv.DictWriter(buf, fieldnames=[*names, "bound_holds"], lineterminator="\n")
        writer.writeheader()
        for r in self.rows:
            writer.writerow({**asdict(r), "bound_holds": r.bound_holds})
        text = buf.getvalue()
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text

    def to_markdown(self) -> str:
        lines = ["| layer | tr(D) | error E | bound B | E ≤ B | clipped | bits/weight | s |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            holds = "yes" if r.bound_holds else ("n/a" if r.clipped else "NO")
            lines.append(f"| {r.name} | {r.trace_d:.4g} | {r.error:.4g} | {r.bound:.4g} | "
                         f"{holds} | {r.clipped} | {r.bits_per_weight:.4g} | {r.seconds:.2f} |")
        return "\n".join(lines)


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder block list and its attribute path (``model.layers`` for Llama)."""
    for path in BLOCK_PATHS:
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            if not any(isinstance(m, nn.Linear) for m in obj[0].modules()):
                raise BabaiError(f"{type(model).__name__}.{path} holds no nn.Linear layers: "
                                 "quantize_model quantizes nn.Linear weights of decoder blocks "
                                 "(Llama-family transformers models)")
            return path, obj
    raise BabaiError(
        f"quantize_model found no decoder block list in {type(model).__name__} (looked for "
        f"{', '.join(BLOCK_PATHS)}): it supports transformers decoder-only LMs of the Llama "
        "family (model.model.layers); for other models use the observe/convert flow, "
        "quantize_(model, babai_config(step='observe')) then step='convert'")


def _config_kwargs(config: Any) -> dict[str, Any]:
    missing = [f for f in CONFIG_FIELDS if not hasattr(config, f)]
    if missing:
        raise BabaiError(f"config {type(config).__name__} lacks {missing}: pass "
                         "babai_ao.babai_config(...) (or any object with "
                         f"{', '.join(CONFIG_FIELDS)})")
    kwargs = {f: getattr(config, f) for f in CONFIG_FIELDS}
    for extra in ("block_size", "refine"):
        if getattr(config, extra, None) is not None:
            kwargs[extra] = getattr(config, extra)
    return kwargs


def _batches(calibration: Any, batch_size: int) -> list[torch.Tensor]:
    """Calibration ids as a list of ``[b, T]`` int64 batches."""
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() == 1:
            calibration = calibration.unsqueeze(0)
        if calibration.dim() != 2 or calibration.is_floating_point():
            raise BabaiError(f"calibration must be token ids [n, seq_len], got a "
                             f"{calibration.dtype} tensor of shape {tuple(calibration.shape)}: "
                             "use babai_ao.calibration_windows(tokenizer)")
        batches = list(calibration.split(batch_size))
    elif isinstance(calibration, Iterable):
        batches = []
        for item in calibration:
            if isinstance(item, dict):
                item = item["input_ids"]
            if not isinstance(item, torch.Tensor) or item.is_floating_point():
                raise BabaiError("calibration items must be token-id tensors (or dicts with "
                                 "input_ids): use babai_ao.calibration_windows(tokenizer)")
            batches.append(item if item.dim() == 2 else item.reshape(1, -1))
    else:
        raise BabaiError(f"calibration of type {type(calibration).__name__} is not supported: "
                         "pass token ids [n, seq_len] from babai_ao.calibration_windows")
    if not batches or any(b.numel() == 0 for b in batches):
        raise BabaiError("calibration is empty: pass at least one window of token ids")
    return [b.to(torch.int64) for b in batches]


def _first_block_inputs(model: nn.Module, block: nn.Module, batches: Sequence[torch.Tensor]
                        ) -> list[tuple[torch.Tensor, tuple, dict]]:
    """``(hidden_states, other args, kwargs)`` that the model passes to its first block."""
    captured: list[tuple[torch.Tensor, tuple, dict]] = []

    def grab(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, tuple(args[1:]), kwargs))
        raise _Stop

    device = next(model.parameters()).device
    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in batches:
            with contextlib.suppress(_Stop):
                model(input_ids=ids.to(device), use_cache=False)
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise BabaiError("the model did not call its first decoder block on the calibration "
                         "data: quantize_model needs a standard decoder forward")
    return captured


def _run(block: nn.Module, inp: tuple[torch.Tensor, tuple, dict]) -> torch.Tensor | None:
    hidden, args, kwargs = inp
    try:
        out = block(hidden, *args, **kwargs)
    except _Stop:
        return None
    return out[0] if isinstance(out, tuple) else out


def _stages(block: nn.Module, inp: tuple[torch.Tensor, tuple, dict]
            ) -> tuple[list[list[str]], set[str]]:
    """Linears grouped by identical input tensor, in call order; and those called > once."""
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    calls: list[tuple[str, torch.Tensor]] = []
    seen: dict[str, int] = {}

    def hook_for(name: str):
        def hook(_m: nn.Module, args: tuple) -> None:
            seen[name] = seen.get(name, 0) + 1
            if seen[name] == 1:
                calls.append((name, args[0]))
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in linears.items()]
    try:
        with torch.no_grad():
            _run(block, inp)
    finally:
        for h in handles:
            h.remove()
    unused = sorted(set(linears) - set(seen))
    if unused:
        raise BabaiError(f"linears {unused} never ran on the calibration data, so they have no "
                         "Hessian: quantize_model needs every linear of a block to be used")
    stages: list[list[str]] = []
    stage_input: list[torch.Tensor] = []
    for name, x in calls:
        for i, xs in enumerate(stage_input):
            if x is xs:
                stages[i].append(name)
                break
        else:
            stages.append([name])
            stage_input.append(x)
    repeated = {n for n, c in seen.items() if c > 1}
    return stages, repeated


def _collect(block: nn.Module, inputs: Sequence[tuple[torch.Tensor, tuple, dict]],
             stages: Sequence[list[str]], stop: bool, keep_outputs: bool,
             replay: _Replay | None = None
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
                raise _Stop
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
                out = _run(block, inp)
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
            for ids in _batches(calibration, batch_size):
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
    if not fits or importlib.util.find_spec(f"{__package__}.tensor") is None:
        if not fits:
            warnings.warn(f"clip=False codes leave the {bits}-bit range: installing "
                          "dequantized float weights (use clip='ssqr' to store them packed)",
                          stacklevel=3)
        with torch.no_grad():
            linear.weight.copy_(qw.dequantize(dtype))
        return
    from .tensor import BabaiQuantizedTensor

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
    batches = _batches(calibration, batch_size)
    report = QuantizationReport(mode=mode)
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    bar = None
    try:
        with torch.no_grad():
            inputs = _first_block_inputs(model, blocks[0], batches)
        steps: Iterable[int] = range(len(blocks))
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(steps, desc=f"quantize ({mode})", unit="block")
            steps = bar
        for b in steps:
            block = blocks[b]
            prefix = f"{path}.{b}"
            last = b == len(blocks) - 1
            stages, repeated = _stages(block, inputs[0])
            if mode == "observe":
                accs, outputs = _collect(block, inputs, stages, stop=False, keep_outputs=not last)
                for stage in stages:
                    report.rows += _quantize_stage(block, prefix, stage, accs[stage[0]], qkwargs,
                                                  config)
            else:
                replay = _Replay()
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
