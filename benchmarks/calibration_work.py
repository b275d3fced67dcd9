"""Calibration work counted, not timed: GFLOP of linears, SDPA and Hessians, rerun vs lockstep
(vs rerun with no replay recordings: a lean stream, ``BlockStream(lean=True)``).

Wall times on a shared machine swing by 10× (BENCHMARKS.md, calibration speed); the FLOPs
each path spends do not. SmolLM2 cut to 2 blocks, 16 × 512 calibration tokens, batches of 8,
w4g64 act-order; counts every ``nn.Linear.forward`` actually computed (replayed outputs are
not), every ``scaled_dot_product_attention`` (4·b·h·t·s·d) and every ``HessianAccumulator.add``
(2·n·K²), in all threads.

    python benchmarks/calibration_work.py
"""

from __future__ import annotations

import copy
import threading

import torch
import torch.nn.functional as F
import transformers.integrations.sdpa_attention as sdpa_module

from babai_ao.ao.config import babai_config
from babai_ao.calibration import lockstep, replay
from babai_ao.calibration.data import calibration_windows
from babai_ao.calibration.models import load_smollm2
from babai_ao.calibration.sequential import quantize_model
from babai_ao.lattice import hessian

LOCK = threading.Lock()
COUNTS: dict[str, float] = {}


def bump(key: str, gflop: float) -> None:
    with LOCK:
        COUNTS[key] = COUNTS.get(key, 0.0) + gflop


def main() -> None:
    torch.set_num_threads(2)
    sdpa, add, linear = (F.scaled_dot_product_attention, hessian.HessianAccumulator.add,
                         torch.nn.Linear.forward)

    def sdpa_count(q, k, v, *args, **kwargs):
        b, h, t, d = q.shape
        bump("sdpa_gflop", 4 * b * h * t * k.shape[-2] * d / 1e9)
        return sdpa(q, k, v, *args, **kwargs)

    def add_count(self, x):
        bump("hessian_gflop", 2 * x.reshape(-1, self.in_features).shape[0]
             * self.in_features ** 2 / 1e9)
        return add(self, x)

    def linear_count(self, x):
        if self.out_features != 49152:  # not lm_head
            bump("linear_gflop", 2 * x.numel() // x.shape[-1] * self.in_features
                 * self.out_features / 1e9)
        return linear(self, x)

    sdpa_module.torch.nn.functional.scaled_dot_product_attention = sdpa_count
    hessian.HessianAccumulator.add = add_count
    torch.nn.Linear.forward = linear_count
    model, tokenizer = load_smollm2(num_layers=2)
    cal = calibration_windows(tokenizer, n=16, seq_len=512)
    config = babai_config(bits=4, group_size=64, order="act", clip=True, damp=0.01)
    budget = replay.REPLAY_BUDGET
    for name, on, recorded in (("rerun", False, budget), ("lockstep", True, budget),
                               ("rerun, no replay (lean stream)", False, 0)):
        lockstep.LOCKSTEP, replay.REPLAY_BUDGET = on, recorded
        COUNTS.clear()
        quantize_model(copy.deepcopy(model), config, cal, batch_size=8, progress=False)
        print(name, {k: round(v, 1) for k, v in sorted(COUNTS.items())},
              "total", round(sum(COUNTS.values()), 1), flush=True)


if __name__ == "__main__":
    main()
