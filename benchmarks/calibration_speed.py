"""Sequential calibration time: the rerun path against lockstep forwards, side by side.

SmolLM2-135M cut to its first ``--blocks`` decoder blocks, P1 calibration (128 × 512 tokens
of wiki.valid.tokens, seed 0), w4g64 act-order: every variant quantizes a fresh copy of the
same model in the same process, in turn (``--rounds`` times, order reversed every other
round, after one untimed warm-up), so that a busy machine slows them alike. Each row records wall and process CPU
seconds, solver seconds and the load average; codes are compared with the rerun path's.

    python benchmarks/calibration_speed.py --blocks 2 --out benchmarks/results/calibration_speed.json

Variants: ``rerun`` (each stage reruns the block from its input, replaying quantized outputs:
the path before lockstep), ``lockstep`` (one paused forward per batch: identical codes),
``lockstep+tiles`` (tiled Hessians), ``lockstep+bf16+tiles`` (bf16 forwards, fp32 Hessians).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from babai_ao.ao.config import babai_config
from babai_ao.calibration import lockstep
from babai_ao.calibration.data import calibration_windows
from babai_ao.calibration.models import load_smollm2
from babai_ao.calibration.sequential import quantize_model

VARIANTS: dict[str, dict[str, Any]] = {
    "rerun": {"hessian_tiles": False},
    "lockstep": {"hessian_tiles": False},
    "lockstep+tiles": {},  # the default since 2026-12-05 (fourth session)
    "lockstep+bf16+tiles": {"forward_dtype": torch.bfloat16},
}


def codes(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.qdata for n, m in model.named_modules()
            if hasattr(getattr(m, "weight", None), "qdata")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--calib-n", type=int, default=128)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2(num_layers=args.blocks)
    cal = calibration_windows(tokenizer, n=args.calib_n, seq_len=args.calib_len)
    config = babai_config(bits=4, group_size=64, order="act", clip=True, damp=0.01)
    names = args.variants.split(",")
    warm = copy.deepcopy(model)  # one-time costs (kernel set-up, lazy imports) out of the rows
    warm.model.layers = warm.model.layers[:1]
    quantize_model(warm, config, cal[:8], batch_size=8, progress=False)
    rows, reference = [], None
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            lockstep.LOCKSTEP = name != "rerun"
            m = copy.deepcopy(model)
            load = os.getloadavg()
            wall, cpu = time.perf_counter(), time.process_time()
            report = quantize_model(m, config, cal, batch_size=8, progress=False,
                                    **VARIANTS[name])
            row = {"variant": name, "round": r, "wall_s": time.perf_counter() - wall,
                   "cpu_s": time.process_time() - cpu, "solver_s": report.solver_seconds,
                   "load_start": load, "load_end": os.getloadavg()}
            got = codes(m)
            if name == "rerun" and reference is None:
                reference = got
            if reference is not None:
                row["packed_bytes_differing_from_rerun"] = sum(
                    int((got[k] != reference[k]).sum()) for k in got) / sum(
                    v.numel() for v in got.values())
            rows.append(row)
            print(json.dumps(row), flush=True)
    lockstep.LOCKSTEP = True
    record = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "blocks": args.blocks, "calibration": [args.calib_n, args.calib_len],
              "threads": args.threads, "torch": torch.__version__, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
