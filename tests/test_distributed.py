"""Sequential calibration on 2 processes (torch.distributed, gloo on CPU) against one process:
the windows split across the ranks, Hessian sums reduced, solves spread and broadcast.

The reference is ``quantize_model`` in this process on the same batches, 1 thread as in each
rank. ``hessian_reduce="ordered"`` (the default) must give the very same stored codes,
scales and zeros, certificates and perplexity, bit for bit, on the 2-block SmolLM2 and on a
tiny MoE where a rank gets no token for some expert. The 2-block SmolLM2 is calibrated
three ways on the ranks — lockstep forwards (the default; ``lockstep.BLOCKS_RUN`` says they
ran), the rerun path (``LOCKSTEP = False``), and one rank each — always against the
one-process lockstep run, with the same collectives in the same order. ``"sum"`` (one fp64 all-reduce) must
give ``H`` as the fp64 sum rounded once (within 1e-6 of the one-process fp32 sum) and, since
a code at a rounding boundary may then flip, a model as good, not the same codes. A rank that fails makes the other stop with a clear
error well within the timeout, and the output directory is never written.
"""

from __future__ import annotations

import copy
import io
import math
import queue
import socket
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

import babai_ao
from babai_ao import BabaiError
from babai_ao.calibration import distributed, lockstep
from babai_ao.lattice.hessian import HessianAccumulator

WORLD = 2
TIMEOUT_S = 20.0  # the group's collective timeout in the workers
CONFIG = dict(bits=4, group_size=64, order="act")
MOE_CONFIG = dict(bits=4, group_size=32, order="act")


# ---- what is compared -----------------------------------------------------------------------
def stored(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every stored tensor of the model, the inner tensors of quantized weights included
    (packed codes, scales, zeros)."""
    out = {}
    for name, t in model.state_dict().items():
        flatten = getattr(t, "__tensor_flatten__", None)
        if flatten is None:
            out[name] = t.detach().clone()
            continue
        inner, _ = flatten()
        for n in inner:
            out[f"{name}:{n}"] = getattr(t, n).detach().clone()
    return out


def rows(report: Any) -> list[tuple]:
    return [(r.name, r.error, r.bound, r.trace_d, r.clipped, r.tokens) for r in report.rows]


def perplexity(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return math.exp(float(model(input_ids=ids, labels=ids).loss))


def tiny_moe() -> torch.nn.Module:
    """Qwen3-MoE, 2 blocks, 8 experts, top-1: few tokens leave some expert without any on a
    rank."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("qwen3_moe", vocab_size=128, hidden_size=64,
                               num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, num_experts=8,
                               num_experts_per_tok=1, moe_intermediate_size=32,
                               decoder_sparse_step=1, mlp_only_layers=[])
    return AutoModelForCausalLM.from_config(cfg).eval()


MOE_IDS = torch.randint(0, 128, (4, 6), generator=torch.Generator().manual_seed(3))


# ---- the ranks ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_bytes(value: Any) -> bytes:
    """A result as bytes: tensors put on a queue as such would need this process alive
    until the parent has read them."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _rank(rank: int, port: int, job: Any, payload: dict, results: Any) -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
            timeout=__import__("datetime").timedelta(seconds=TIMEOUT_S))
        try:
            work = JOBS[job] if isinstance(job, str) else job  # (another module's job)
            results.put((rank, "ok", as_bytes(work(rank, payload))))
        finally:
            torch.distributed.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which asserts on it
        results.put((rank, "error", (type(e).__name__, str(e), time.perf_counter() - t0,
                                     traceback.format_exc())))


def batches(rank: int) -> list[torch.Tensor]:
    """Layer inputs of 4 batches × 16 tokens (2 per rank)."""
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(16, 24, generator=g) * (1 + b) for b in range(4)]
    return xs[2 * rank:2 * rank + 2]


# the dense runs on the ranks: whether each rank uses lockstep forwards, quantize_model kwargs
DENSE_RUNS = {"dense": (True, True), "dense-rerun": (False, False),
              "dense-mixed": (True, False)}


def _quantize_job(rank: int, payload: dict) -> dict:
    out = {}
    for key, use_lockstep in DENSE_RUNS.items():
        model = copy.deepcopy(payload["model"])
        lockstep.LOCKSTEP, before = use_lockstep[rank], lockstep.BLOCKS_RUN
        try:
            report = babai_ao.quantize_model(model, babai_ao.babai_config(**CONFIG),
                                             payload["calib"], batch_size=1, progress=False)
        finally:
            lockstep.LOCKSTEP = True
        out[key] = (stored(model), rows(report), perplexity(model, payload["eval"]),
                    list(distributed.LAST_LOG), lockstep.BLOCKS_RUN - before)
    for reduce in distributed.REDUCTIONS:
        model, before = tiny_moe(), lockstep.BLOCKS_RUN
        report = babai_ao.quantize_model(model, babai_ao.babai_config(**MOE_CONFIG), MOE_IDS,
                                         batch_size=1, progress=False, hessian_reduce=reduce)
        out[f"moe-{reduce}"] = (stored(model), rows(report), None, list(distributed.LAST_LOG),
                                lockstep.BLOCKS_RUN - before)
        # the reduction itself, on known partials: 24 features, 2 batches per rank
        _, token = distributed.start([0, 1, 2, 3], reduce)
        try:
            acc = distributed.hessian(24, "cpu")
            for x in batches(rank):
                acc.add(x)
            out[f"H-{reduce}"] = distributed.reduce_hessians([acc])[0]
            tiled = distributed.hessian(24, "cpu", tiles=3)  # as lockstep's hessian_tiles
            for x in batches(rank):
                tiled.add(x)
            out[f"H-{reduce}-tiled"] = (tiled.tiles, distributed.reduce_hessians([tiled])[0])
        finally:
            distributed.stop(token)
    return out


def _failing_job(rank: int, payload: dict) -> None:
    """``babai-ao quantize``'s work on every rank; rank 1 fails in its 3rd Hessian reduction."""
    from babai_ao.calibration import sequential
    from babai_ao.cli.depth import Depth
    from babai_ao.cli.quantize import make_config, quantize_and_save

    if rank == 1:
        calls = [0]
        reduce = sequential.reduce_hessians

        def failing(accs):
            calls[0] += 1
            if calls[0] == 3:
                raise RuntimeError("injected failure on rank 1")
            return reduce(accs)

        sequential.reduce_hessians = lockstep.reduce_hessians = failing  # (lockstep: its stages)
    args = SimpleNamespace(model="smollm2", bits=4, group_size=64, order="act", clip="true",
                           target_bits=None, outlier_density=None, refine=0, symmetric=False,
                           exact_offset=False, mode="sequential", calib_file=None,
                           calib_windows=16, calib_len=32, seed=0, no_progress=True,
                           overwrite=False)
    model = copy.deepcopy(payload["model"])
    quantize_and_save(model, payload["tokenizer"], args, make_config(args), Depth(2, 30),
                      Path(payload["out"]))


JOBS = {"quantize": _quantize_job, "fail": _failing_job}


def run_ranks(job: Any, payload: dict, wait_s: float = 120.0) -> dict[int, tuple]:
    """Start ``WORLD`` independent processes (a failing one does not take the others down,
    as torch.multiprocessing.spawn would) and collect each one's result or error."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, job, payload, results))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    got: dict[int, tuple] = {}
    try:
        deadline = time.monotonic() + wait_s
        while len(got) < WORLD:
            try:
                rank, status, value = results.get(timeout=max(deadline - time.monotonic(), 0.1))
            except queue.Empty:
                raise AssertionError(f"ranks {sorted(set(range(WORLD)) - set(got))} did not "
                                     f"finish within {wait_s} s") from None
            got[rank] = (status, torch.load(io.BytesIO(value), weights_only=False)
                         if status == "ok" else value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return got


# ---- tests ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def both(smollm2_small, calibration_small):
    """The 2-rank results and the one-process reference (1 thread, same batches)."""
    model, tokenizer = smollm2_small
    calib = calibration_small[:, :64]  # 4 windows × 64 tokens, batch_size 1: 2 per rank
    eval_ids = calibration_small[:2, 64:]
    ranks = run_ranks("quantize", {"model": model, "calib": calib, "eval": eval_ids})
    for rank, (status, value) in ranks.items():
        assert status == "ok", f"rank {rank}: {value}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one, before = copy.deepcopy(model), lockstep.BLOCKS_RUN
        report = babai_ao.quantize_model(one, babai_ao.babai_config(**CONFIG), calib,
                                         batch_size=1, progress=False)
        assert lockstep.BLOCKS_RUN - before == 2  # the reference ran in lockstep too
        moe = tiny_moe()
        with pytest.warns(UserWarning, match="received no calibration tokens"):
            moe_report = babai_ao.quantize_model(moe, babai_ao.babai_config(**MOE_CONFIG),
                                                 MOE_IDS, batch_size=1, progress=False)
    finally:
        torch.set_num_threads(threads)
    reference = {"dense": (stored(one), rows(report), perplexity(one, eval_ids)),
                 "moe": (stored(moe), rows(moe_report))}
    return {r: v for r, (_, v) in ranks.items()}, reference


def assert_same_tensors(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, f"{len(different)} stored tensors differ, e.g. {different[:3]}"


def test_ordered_reduction_gives_the_single_process_codes_bit_for_bit(both) -> None:
    ranks, reference = both
    tensors, report_rows, ppl = reference["dense"]
    assert any(":" in k for k in tensors)  # the packed codes themselves are compared
    for rank in range(WORLD):  # every rank ends with the one-process model and report
        got_tensors, got_rows, got_ppl, _, lockstep_blocks = ranks[rank]["dense"]
        assert lockstep_blocks == 2  # both blocks ran in lockstep on this rank
        assert_same_tensors(got_tensors, tensors)
        assert got_rows == report_rows  # certificates, token counts: exactly equal
        assert got_ppl == ppl


@pytest.mark.parametrize("key", ["dense-rerun", "dense-mixed"])
def test_rerun_path_and_mixed_paths_give_the_same_codes_and_collectives(both, key) -> None:
    """The rerun path on both ranks, or lockstep on rank 0 and the rerun path on rank 1 (as
    when one rank's inputs exceed ``LOCKSTEP_BUDGET``): the one-process lockstep model, and
    the very collectives (op, bytes) of the lockstep run, in its order."""
    ranks, reference = both
    tensors, report_rows, ppl = reference["dense"]
    for rank in range(WORLD):
        got_tensors, got_rows, got_ppl, log, lockstep_blocks = ranks[rank][key]
        assert lockstep_blocks == (2 if DENSE_RUNS[key][rank] else 0)
        assert_same_tensors(got_tensors, tensors)
        assert got_rows == report_rows
        assert got_ppl == ppl
        sequence = [(t.op, t.nbytes) for t in log]
        assert sequence == [(t.op, t.nbytes) for t in ranks[rank]["dense"][3]]


def test_reductions_against_float_sums(both) -> None:
    ranks, _ = both
    one = HessianAccumulator(24)  # what one process does: fp32, batch order
    for x in batches(0) + batches(1):
        one.add(x)
    in_order = one.hessian
    tiled = HessianAccumulator(24, tiles=3)  # lockstep's hessian_tiles in one process
    for x in batches(0) + batches(1):
        tiled.add(x)
    fp64 = sum((x.T @ x).double() for x in batches(0) + batches(1))
    for rank in range(WORLD):
        ordered, summed = ranks[rank]["H-ordered"], ranks[rank]["H-sum"]
        assert ordered.tokens == summed.tokens == 4 * 16  # SUM of counts, never an average
        assert torch.equal(ordered.hessian, in_order)
        tiles, ordered_tiled = ranks[rank]["H-ordered-tiled"]
        assert tiles == 3 and torch.equal(ordered_tiled.hessian, tiled.hessian)
        assert ranks[rank]["H-sum-tiled"][1].tokens == 4 * 16
        assert torch.equal(summed.hessian, fp64.float())  # one rounding of the fp64 sum
        assert (summed.hessian - in_order).abs().max() <= 1e-6 * in_order.abs().max()
    assert not torch.equal(fp64.float(), in_order)  # the two reductions do differ here


def test_fp64_sum_reduction_quantizes_as_well(both) -> None:
    """``sum`` is not bit-identical (a code at a rounding boundary may flip, and sequential
    calibration carries it on): both ranks agree, token counts are exact, errors close."""
    ranks, reference = both
    _, report_rows = reference["moe"]
    got_tensors, got_rows, _, _, _ = ranks[0]["moe-sum"]
    assert_same_tensors(ranks[1]["moe-sum"][0], got_tensors)
    assert [(r[0], r[5]) for r in got_rows] == [(r[0], r[5]) for r in report_rows]
    total, want = sum(r[1] for r in got_rows), sum(r[1] for r in report_rows)
    assert total == pytest.approx(want, rel=0.05)


def test_work_and_traffic_are_shared(both) -> None:
    ranks, reference = both
    _, report_rows, _ = reference["dense"]
    calib_tokens = 4 * 64
    assert all(r[5] == calib_tokens for r in report_rows)
    for rank in range(WORLD):
        log = ranks[rank]["dense"][3]
        counts = [t for t in log if t.op == "all_reduce(tokens)"]
        assert counts and all(t.tokens_here == (calib_tokens // WORLD,) for t in counts)
        assert all(t.tokens_all == (calib_tokens,) for t in counts)
        ops = {t.op for t in log}
        assert ("send(H)" in ops) == (rank == 0) and ("recv(H)" in ops) == (rank == 1)
        assert {"broadcast(H)", "broadcast(result)"} <= ops
        assert not any(t.op == "all_reduce(H)" for t in log)  # ordered: no fp64 all-reduce
    assert any(t.op == "all_reduce(H)" for t in ranks[0]["moe-sum"][3])
    # the same collectives in the same order on both ranks (payload sizes of broadcasts)
    shape = [(t.op.split("(")[0], t.nbytes) for t in ranks[0]["moe-sum"][3]]
    assert shape == [(t.op.split("(")[0], t.nbytes) for t in ranks[1]["moe-sum"][3]]


def test_moe_with_a_rank_that_routes_no_token_to_an_expert(both) -> None:
    ranks, reference = both
    tensors, report_rows = reference["moe"]
    expert_rows = [r for r in report_rows if ".experts." in r[0]]
    assert len(expert_rows) == 2 * 2 * 8
    for rank in range(WORLD):
        got_tensors, got_rows, _, log, lockstep_blocks = ranks[rank]["moe-ordered"]
        assert lockstep_blocks == 0  # fused experts: the rerun path, reduced all the same
        assert_same_tensors(got_tensors, tensors)
        assert got_rows == report_rows
    # the case that matters happened: some expert had tokens on one rank and none on another
    # (and some none at all), and both ranks still took part in every reduction
    per_rank = [[t for t in ranks[r]["moe-ordered"][3] if t.op == "all_reduce(tokens)"]
                for r in range(WORLD)]
    assert len(per_rank[0]) == len(per_rank[1])
    lopsided = [(a.tokens_here, b.tokens_here) for a, b in zip(*per_rank, strict=True)
                if any((x == 0) != (y == 0) for x, y in zip(a.tokens_here, b.tokens_here,
                                                             strict=True))]
    assert lopsided
    assert any(r[5] == 0 for r in expert_rows)


def test_a_failing_rank_stops_the_other_with_a_clear_error_and_no_output(
        smollm2_small, tmp_path) -> None:
    model, tokenizer = smollm2_small
    out = tmp_path / "run"
    t0 = time.monotonic()
    ranks = run_ranks("fail", {"model": model, "tokenizer": tokenizer, "out": str(out)},
                      wait_s=TIMEOUT_S + 60)
    status, (kind, message, seconds, _) = ranks[1]
    assert (status, kind, message) == ("error", "RuntimeError", "injected failure on rank 1")
    status, (kind, message, seconds, trace) = ranks[0]
    assert status == "error" and kind == "BabaiError", trace
    assert "distributed calibration stopped at" in message and "another rank failed" in message
    assert "\n" not in message
    assert seconds < TIMEOUT_S + 10  # it noticed the failure; it did not hang
    assert time.monotonic() - t0 < TIMEOUT_S + 60
    assert not out.exists() and not list(tmp_path.iterdir())  # no output, no temporary


def test_too_few_batches_and_bad_reduction_are_refused() -> None:
    with pytest.raises(BabaiError, match="hessian_reduce='mean'"):
        distributed.start([1, 2], "mean")
    assert distributed.shard(list(range(5)), 0, 2) == [0, 1]
    assert distributed.shard(list(range(5)), 1, 2) == [2, 3, 4]
    # cost-balanced owners: q (576·576²) alone, k and v (192·576² each) together
    assert distributed.owners([576, 192, 192], 2) == [0, 1, 1]
    assert distributed.owners([5, 5, 5, 5], 2) == [0, 1, 0, 1]


def test_cli_nproc_runs_torchrun_and_rank_0_writes_the_single_process_result(
        smollm2_small, tmp_path) -> None:
    """``babai-ao quantize --nproc 2`` → torchrun → ``python -m babai_ao`` on 2 ranks: one
    output directory, written whole, with the certificates of the 1-process run."""
    import json
    import subprocess
    import sys

    from babai_ao.calibration.data import calibration_windows

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "babai_ao", "quantize", "smollm2", "--num-layers", "1",
           "--calib-windows", "16", "--calib-len", "16", "--nproc", "2", "--no-progress",
           "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("saved to") == 1  # rank 0 alone writes and reports
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary left
    record = json.loads((out / "babai_run.json").read_text())
    assert record["processes"] == 2
    model = copy.deepcopy(smollm2_small[0])
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    calib = calibration_windows(smollm2_small[1], n=16, seq_len=16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's workers (OMP_NUM_THREADS=1)
    try:
        report = babai_ao.quantize_model(model, babai_ao.babai_config(**CONFIG), calib,
                                         batch_size=8, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert [(r["name"], r["error"], r["tokens"]) for r in record["layers"]] == \
        [(r.name, r.error, r.tokens) for r in report.rows]
