"""Block tuning (``tune=``) inside a 2-process ``torch.distributed`` calibration (gloo, CPU).

Each rank holds half of the calibration batches. The reference is the single-process run on
the same windows (1 thread, as each rank): every rank must end with the very same stored
tensors (codes, tuned scales, tuned norm weights), report rows, tuning log (block MSE before
and after, kept or not) as that run, bit for bit — the Adam steps use the gradient of the
rank that holds each step's batch, broadcast to all (``distributed.share_gradients``), and
the keep-or-drop losses are summed per batch in one order (``gather_batch_sums``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_distributed import WORLD, rows, run_ranks, stored

import babai_ao
from babai_ao.calibration import distributed
from babai_ao.calibration.tuning import TuneSettings

CONFIG = dict(bits=4, group_size=64, order="act")
TUNE = TuneSettings(steps=8, lr=5e-4, windows=1, seed=0)  # both blocks kept


def _tune_job(rank: int, payload: dict) -> dict:
    model = copy.deepcopy(payload["model"])
    report = babai_ao.quantize_model(model, babai_ao.babai_config(**CONFIG), payload["calib"],
                                     batch_size=1, progress=False, tune=TUNE)
    ops = [t.op for t in distributed.LAST_LOG]
    return {"stored": stored(model), "rows": rows(report), "tuning": report.tuning,
            "grads": ops.count("broadcast(grad)"), "has": ops.count("broadcast(has grad)"),
            "sums": ops.count("all_reduce(batch sums)")}


def _owners(batches: int) -> list[int]:
    """The ranks whose batch each of the tuning's steps draws (as ``tune_block`` draws)."""
    g = torch.Generator().manual_seed(TUNE.seed)
    drawn = []
    for _ in range(TUNE.steps):
        drawn.append(int(torch.randint(batches, (1,), generator=g)))
        torch.randperm(1, generator=g)  # the windows of a 1-window batch
    return [i * WORLD // batches for i in drawn]  # contiguous halves: rank = ⌊i·W/n⌋


def test_tuned_blocks_equal_on_both_ranks_and_to_one_process(smollm2_small,
                                                             calibration_small):
    model, _ = smollm2_small
    calib = calibration_small[:, :64]  # 4 windows × 64 tokens, batch_size 1: 2 per rank
    assert set(_owners(len(calib))) == {0, 1}  # both ranks compute some steps' gradients
    ranks = run_ranks(_tune_job, {"model": model, "calib": calib})
    for rank, (status, value) in ranks.items():
        assert status == "ok", f"rank {rank}: {value}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = copy.deepcopy(model)
        report = babai_ao.quantize_model(one, babai_ao.babai_config(**CONFIG), calib,
                                         batch_size=1, progress=False, tune=TUNE)
    finally:
        torch.set_num_threads(threads)
    want = stored(one)
    assert all(t["kept"] for t in report.tuning)  # tuning changed scales: a real check
    for rank in range(WORLD):
        got = ranks[rank][1]
        assert got["tuning"] == report.tuning, rank  # same losses, same keep decisions
        assert got["rows"] == rows(report), rank
        assert got["stored"].keys() == want.keys()
        different = [k for k in want if not torch.equal(got["stored"][k], want[k])]
        assert not different, f"rank {rank}: {len(different)} tensors differ: {different[:3]}"
        # per block: each step's gradient broadcast (one per tuned tensor), two loss gathers
        assert got["has"] == 2 * TUNE.steps and got["sums"] == 2 * 2
        assert got["grads"] > got["has"]


def test_gather_batch_sums_in_one_process_is_the_identity():
    assert distributed.gather_batch_sums([(1.5, 2.0), (3.0, 4.0)], 0, 2) == [[1.5, 2.0],
                                                                           [3.0, 4.0]]
    assert distributed.layout() is None and distributed.owner_of(3) == 0
    assert distributed.rank() == 0


@pytest.mark.parametrize("n, world", [(4, 2), (5, 2), (7, 3)])
def test_owner_of_matches_the_shards(n, world):
    """``owner_of`` inverts ``shard``: batch i is in the shard of the rank it names."""
    from babai_ao.calibration.distributed import _ACTIVE, Group

    for r in range(world):
        token = _ACTIVE.set(Group(r, world, "ordered", torch.device("cpu"), sizes=(1,) * n))
        try:
            assert distributed.layout() == ((1,) * n, distributed.shard(range(n), r, world)[0])
            for i in range(n):
                assert (i in distributed.shard(range(n), distributed.owner_of(i), world))
        finally:
            _ACTIVE.reset(token)
