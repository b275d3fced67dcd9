"""quantize_model: block-by-block calibration on the real model (2 blocks of SmolLM2)."""

from __future__ import annotations

import copy
import importlib.util
import math
from types import SimpleNamespace

import pytest
import torch
from babai_ao.kernels.cpu_int4 import exact_forwards
from torch import nn

from babai_ao import BabaiError, HessianAccumulator, quantize_weight
from babai_ao.calibration.sequential import (
    QuantizationReport,
    decoder_blocks,
    layer_hessians,
    quantize_model,
)

pytestmark = pytest.mark.model
BATCH = 2


def cfg(**kw) -> SimpleNamespace:
    base = dict(bits=4, group_size=64, symmetric=False, order="act", clip=True, damp=0.01)
    return SimpleNamespace(**{**base, **kw})


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    _, blocks = decoder_blocks(model)
    return {f"model.layers.{i}.{n}": m for i, b in enumerate(blocks)
            for n, m in b.named_modules() if isinstance(m, nn.Linear)}


def plain(w: torch.Tensor) -> torch.Tensor:
    w = w.detach()
    return w.dequantize() if type(w) is not torch.Tensor else w


def input_hessians(model: nn.Module, calibration: torch.Tensor) -> dict[str, torch.Tensor]:
    """Independent reference: ``XᵀX`` of every decoder linear's input in a whole-model run."""
    accs = {n: HessianAccumulator(m.in_features) for n, m in linears(model).items()}
    handles = [m.register_forward_pre_hook(lambda _m, a, n=n: accs[n].add(a[0]))
               for n, m in linears(model).items()]
    try:
        with torch.no_grad(), exact_forwards():  # the model's exact fp32 numbers
            for ids in calibration.split(BATCH):
                model.model(input_ids=ids, use_cache=False)  # no lm_head: not needed
    finally:
        for h in handles:
            h.remove()
    return {n: a.hessian for n, a in accs.items()}


def assert_matches_reference(float_model, quantized, hessians, config):
    """Each installed weight = quantize_weight(float W, reference H) (codes may differ in a
    handful of ties from float summation order)."""
    flt = linears(float_model)
    for name, lin in linears(quantized).items():
        ref = quantize_weight(flt[name].weight.detach(), hessians[name], bits=config.bits,
                              group_size=config.group_size, symmetric=config.symmetric,
                              order=config.order, clip=config.clip, damp=config.damp)
        got = plain(lin.weight)
        differ = (got != ref.dequantize()).float().mean().item()
        assert differ < 1e-3, f"{name}: {differ:.2%} of weights differ from the reference"


@pytest.fixture(scope="module")
def sequential(smollm2_small, calibration_small):
    model = copy.deepcopy(smollm2_small[0])
    report = quantize_model(model, cfg(), calibration_small, batch_size=BATCH, progress=False)
    return model, report


def test_sequential_hessians_are_those_of_the_quantized_model(smollm2_small, calibration_small,
                                                              sequential):
    """Sequential (stages in run order): every linear was calibrated on its input in the
    final quantized model, since everything upstream of it was quantized before it."""
    model, _ = sequential
    assert_matches_reference(smollm2_small[0], model, input_hessians(model, calibration_small),
                             cfg())


def test_observe_hessians_are_those_of_the_float_model(smollm2_small, calibration_small):
    model = copy.deepcopy(smollm2_small[0])
    hessians = input_hessians(model, calibration_small)
    quantize_model(model, cfg(), calibration_small, mode="observe", batch_size=BATCH,
                   progress=False)
    assert_matches_reference(smollm2_small[0], model, hessians, cfg())


def test_layer_hessians_match_reference(smollm2_small, calibration_small):
    model = smollm2_small[0]
    accs = layer_hessians(model, calibration_small, batch_size=BATCH)
    ref = input_hessians(model, calibration_small)
    assert list(accs) == list(ref)
    for name, acc in accs.items():
        torch.testing.assert_close(acc.hessian, ref[name], rtol=1e-5, atol=1e-3)
        assert acc.tokens == calibration_small.numel()
    for b in range(2):
        p = f"model.layers.{b}."
        assert accs[p + "self_attn.q_proj"] is accs[p + "self_attn.v_proj"]
        assert accs[p + "mlp.gate_proj"] is accs[p + "mlp.up_proj"]
        assert accs[p + "self_attn.o_proj"] is not accs[p + "self_attn.q_proj"]


def test_every_linear_replaced_and_on_grid(smollm2_small, sequential):
    model, _ = sequential
    flt = linears(smollm2_small[0])
    for name, lin in linears(model).items():
        w = plain(lin.weight)
        assert not torch.equal(w, flt[name].weight), name
        groups = w.reshape(-1, 64)
        distinct = max(len(torch.unique(g)) for g in groups[:: max(1, len(groups) // 50)])
        assert distinct <= 16, f"{name} has {distinct} values in a 4-bit group"
        if importlib.util.find_spec("babai_ao.ao.tensor") is not None:
            from babai_ao.ao.tensor import BabaiQuantizedTensor

            assert isinstance(lin.weight, BabaiQuantizedTensor), name
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_output_close_to_float_and_better_than_rtn(smollm2_small, calibration_small, sequential):
    model, _ = sequential
    rtn = copy.deepcopy(smollm2_small[0])
    for lin in linears(rtn).values():
        q = quantize_weight(lin.weight.detach(), None, bits=4, group_size=64, order="natural")
        lin.weight.data.copy_(q.dequantize())
    ids = calibration_small
    with torch.no_grad():
        ref = smollm2_small[0].model(ids).last_hidden_state
        ours = model.model(ids).last_hidden_state
        base = rtn.model(ids).last_hidden_state
    err, err_rtn = (ours - ref).norm() / ref.norm(), (base - ref).norm() / ref.norm()
    assert err < 0.1
    assert err < err_rtn


def test_report_rows(sequential, calibration_small):
    model, report = sequential
    assert isinstance(report, QuantizationReport) and report.mode == "sequential"
    assert [r.name for r in report.rows] == list(linears(model))  # run order = module order
    for r in report.rows:
        assert r.tokens == calibration_small.numel()
        assert r.bits_per_weight == 4 + (16 + 4) / 64
        assert all(math.isfinite(v) and v >= 0 for v in
                   (r.trace_d, r.error, r.error_undamped, r.bound, r.seconds))
        assert r.error_undamped <= r.error * (1 + 1e-5)
    assert report.seconds >= report.solver_seconds > 0
    csv_lines = report.to_csv().splitlines()
    assert len(csv_lines) == 15 and csv_lines[0].startswith("name,trace_d,error")
    table = report.to_markdown().split("\n\n")[0]
    assert len(table.splitlines()) == 16
    assert "Left in float" in report.to_markdown()


def test_no_clipping_bound_holds_everywhere(smollm2_small, calibration_small):
    model = copy.deepcopy(smollm2_small[0])
    with pytest.warns(UserWarning, match="dequantized"):
        report = quantize_model(model, cfg(clip=False, bits=3),
                                calibration_small, batch_size=BATCH, progress=False)
    assert len(report.rows) == 14
    assert all(r.clipped == 0 and r.error <= r.bound for r in report.rows)
    assert report.bound_checks() == (14, 14)


def test_interrupt_leaves_no_hooks(smollm2_small, calibration_small, monkeypatch):
    from babai_ao.calibration import sequential as seq

    model = copy.deepcopy(smollm2_small[0])
    stage = seq._quantize_stage

    def boom(block, prefix, *args, **kwargs):  # Ctrl-C while block 1 is being quantized
        if prefix.endswith(".1"):
            raise KeyboardInterrupt
        return stage(block, prefix, *args, **kwargs)

    monkeypatch.setattr(seq, "_quantize_stage", boom)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(model, cfg(), calibration_small, batch_size=BATCH, progress=False)
    for m in model.modules():
        assert not m._forward_pre_hooks
    block0 = linears(model)["model.layers.0.mlp.down_proj"]
    assert not torch.equal(plain(block0.weight), smollm2_small[0].model.layers[0].mlp.down_proj.weight)


def test_errors(smollm2_small, calibration_small):
    with pytest.raises(BabaiError, match="no block list"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), cfg(), calibration_small)
    no_linear = nn.Module()
    no_linear.model = nn.Module()
    no_linear.model.layers = nn.ModuleList([nn.LayerNorm(4)])
    with pytest.raises(BabaiError, match="no nn.Linear"):
        quantize_model(no_linear, cfg(), calibration_small)
    model = copy.deepcopy(smollm2_small[0])
    with pytest.raises(BabaiError, match="lacks"):
        quantize_model(model, SimpleNamespace(bits=4), calibration_small)
    with pytest.raises(BabaiError, match="mode"):
        quantize_model(model, cfg(), calibration_small, mode="greedy")
    with pytest.raises(BabaiError, match="token ids"):
        quantize_model(model, cfg(), calibration_small.float())
    with pytest.raises(BabaiError, match="empty"):
        quantize_model(model, cfg(), [])
    with pytest.raises(BabaiError, match="group_size"):
        quantize_model(model, cfg(group_size=100), calibration_small, progress=False)


def test_replay_gives_the_same_model(smollm2_small, calibration_small, sequential, monkeypatch):
    """Replaying quantized linears' and attention/MLP outputs across stage forwards changes
    nothing: the same codes as recomputing every forward in full."""
    from babai_ao.calibration import replay

    replayed, replayed_report = sequential
    monkeypatch.setattr(replay, "REPLAY_BUDGET", 2**20)  # 1 MiB: most outputs recomputed
    capped = copy.deepcopy(smollm2_small[0])
    quantize_model(capped, cfg(), calibration_small, batch_size=BATCH, progress=False)
    monkeypatch.setattr(replay, "REPLAY", False)
    model = copy.deepcopy(smollm2_small[0])
    report = quantize_model(model, cfg(), calibration_small, batch_size=BATCH, progress=False)
    ref = linears(model)
    for other in (replayed, capped):
        for name, lin in linears(other).items():
            assert torch.equal(lin.weight.qdata, ref[name].weight.qdata), name
    assert [r.error for r in report.rows] == [r.error for r in replayed_report.rows]


def test_replay_recomputes_an_output_changed_in_place():
    """A replayed output is reused only while untouched; after an in-place write downstream
    (or with no budget to record) the linear is computed again: every forward sees the true
    value."""
    from babai_ao.calibration.replay import Replay

    class Counting(nn.Linear):
        computed = 0

        def forward(self, x):
            Counting.computed += 1
            return super().forward(x)

    class Toy(nn.Module):
        def __init__(self, inplace: bool):
            super().__init__()
            self.a, self.b, self.inplace = Counting(4, 4), nn.Linear(4, 4), inplace

        def forward(self, x):
            y = self.a(x)
            if self.inplace:
                y.mul_(2)  # downstream in-place use: the recorded output is now stale
            return self.b(y)

    for inplace, computed, budget in ((False, 1, 2**30), (True, 3, 2**30), (False, 3, 0)):
        torch.manual_seed(0)
        toy, x = Toy(inplace), torch.randn(3, 4)
        with torch.no_grad():
            ref = toy(x)
            replay = Replay(budget=budget)  # 0: nothing recorded
            replay.watch(toy.a, "a")
            Counting.computed = 0
            outs = [toy(x) for _ in range(3)]
            replay.close()
        assert Counting.computed == computed
        assert not replay.outputs and replay.nbytes == 0
        assert "forward" not in vars(toy.a)  # closed: the class's forward again
        for out in outs:
            torch.testing.assert_close(out, ref)


def test_lockstep_gives_the_same_model(smollm2_small, calibration_small, sequential, monkeypatch):
    """One paused forward per batch (``lockstep``) instead of one rerun per stage: the same
    codes, the same certificates and the same block outputs as the rerun path."""
    from babai_ao.calibration import lockstep

    fast, fast_report = sequential
    assert lockstep.LOCKSTEP
    monkeypatch.setattr(lockstep, "LOCKSTEP", False)
    model = copy.deepcopy(smollm2_small[0])
    report = quantize_model(model, cfg(), calibration_small, batch_size=BATCH, progress=False)
    ref = linears(model)
    for name, lin in linears(fast).items():
        assert torch.equal(lin.weight.qdata, ref[name].weight.qdata), name
    assert [r.error for r in report.rows] == [r.error for r in fast_report.rows]
    assert [r.name for r in report.rows] == [r.name for r in fast_report.rows]
    with torch.no_grad():
        ids = calibration_small[:BATCH]
        assert torch.equal(fast.model(input_ids=ids).last_hidden_state,
                           model.model(input_ids=ids).last_hidden_state)


def test_stages_are_probed_once_per_kind_of_block(smollm2_small, calibration_small, sequential,
                                                 monkeypatch):
    """Blocks built alike reuse the first one's probe forward; a block of another kind is
    probed itself; the model is the same as with a probe in every block."""
    from babai_ao.calibration import sequential as seq

    calls = []
    probe = seq.linear_stages

    def counted(block, inp):
        calls.append(type(block).__name__)
        return probe(block, inp)
    monkeypatch.setattr(seq, "linear_stages", counted)
    model = copy.deepcopy(smollm2_small[0])
    layers = decoder_blocks(model)[1]
    assert len(layers) == 2
    quantize_model(model, cfg(), calibration_small, batch_size=BATCH, progress=False)
    assert calls == [type(layers[0]).__name__]  # block 1 reuses block 0's stages
    fast, _ = sequential
    for name, lin in linears(fast).items():
        assert torch.equal(lin.weight.qdata, linears(model)[name].weight.qdata), name
    calls.clear()
    model = copy.deepcopy(smollm2_small[0])
    down = decoder_blocks(model)[1][1].mlp.down_proj
    down.__class__ = type("OtherLinear", (type(down),), {})  # same maths, another layer kind
    quantize_model(model, cfg(), calibration_small, batch_size=BATCH, progress=False)
    assert len(calls) == 2  # block 1 is probed itself


def test_lockstep_stops_its_forwards_on_error(monkeypatch):
    """A failing stage leaves no forward thread behind and no hook on the block; the error
    reaches the caller; the outputs match a plain forward when all goes well."""
    import threading

    from babai_ao.calibration import lockstep

    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    inputs = [(torch.randn(2, 3, 4), (), {}) for _ in range(3)]
    seen: list[tuple[str, int]] = []

    def quantize(stage, acc):
        seen.append((stage[0], acc.tokens))
        if stage[0] == "2":
            raise RuntimeError("solver failed")

    before = threading.active_count()
    with pytest.raises(RuntimeError, match="solver failed"):
        lockstep.calibrate_block(block, inputs, [None] * 3, [["0"], ["2"]], quantize, True)
    assert seen == [("0", 18), ("2", 18)]
    assert threading.active_count() == before
    assert not any(m._forward_pre_hooks for m in block.modules())
    outs = lockstep.calibrate_block(block, inputs, [None] * 3, [["0"], ["2"]],
                                    lambda s, a: None, True)
    with torch.no_grad():
        for out, (x, _, _) in zip(outs, inputs):
            assert torch.equal(out, block(x))


def test_bf16_forwards_give_float32_hessians_of_the_quantized_model(smollm2_small,
                                                                     calibration_small,
                                                                     monkeypatch):
    """``forward_dtype=bfloat16`` (with tiled Hessians): each stage's Hessian is float32 and
    within bf16 rounding of ``XᵀX`` of its input in the final quantized model run in float32;
    afterwards every linear runs its installed weight again (no dense bf16 copy left)."""
    from babai_ao.calibration import sequential as seq

    seen: dict[str, torch.Tensor] = {}
    stage = seq._quantize_stage

    def spy(block, prefix, names, acc, *args, **kwargs):
        for n in names:
            seen[f"{prefix}.{n}"] = acc.hessian.clone()
        return stage(block, prefix, names, acc, *args, **kwargs)

    monkeypatch.setattr(seq, "_quantize_stage", spy)
    model = copy.deepcopy(smollm2_small[0])
    quantize_model(model, cfg(), calibration_small, batch_size=BATCH, progress=False,
                   forward_dtype=torch.bfloat16, hessian_tiles=True)
    ref = input_hessians(model, calibration_small)
    assert list(seen) == list(ref)
    for name, h in seen.items():
        assert h.dtype == torch.float32
        rel = ((h - ref[name]).norm() / ref[name].norm()).item()
        assert rel < 2e-2, f"{name}: {rel:.3%}"
    for lin in linears(model).values():
        assert "forward" not in vars(lin)
        assert lin.weight.qdata is not None
    with pytest.raises(BabaiError, match="sequential"):
        quantize_model(copy.deepcopy(smollm2_small[0]), cfg(), calibration_small,
                       mode="observe", forward_dtype=torch.bfloat16, progress=False)
    with pytest.raises(BabaiError, match="forward_dtype"):
        quantize_model(copy.deepcopy(smollm2_small[0]), cfg(), calibration_small,
                       forward_dtype=torch.int8, progress=False)
