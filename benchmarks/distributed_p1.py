"""P1 sequential calibration in 1 process × 2 threads against 2 processes × 1 thread
(and 1 × 1, the reference for the codes).

SmolLM2-135M-Instruct fp32 on CPU, babai w4 g64 act-order, ``quantize_model`` sequential,
128 × 512 calibration tokens of wiki.valid.tokens (seed 0), batches of 8 windows (16
batches: 8 per rank). Each run is a fresh process (the model loaded before the clock
starts); the 2-process run uses ``torch.distributed`` (gloo) with the default
``hessian_reduce="ordered"``. Every run uses the default lockstep stage forwards
(``calibration.lockstep``; in the 2-process run each rank runs its own batches in lockstep,
reducing each stage's Hessian between stages); each run records how many blocks ran in
lockstep, and ``lockstep_in_every_run`` says whether all blocks of all runs did. Records wall time of calibrate + quantize, whether the stored
tensors (packed codes, scales, zeros) are identical (SHA-256 over all of them; against
1 process × 1 thread, since LAPACK's fp32 Cholesky depends on the thread count), the solve
vs forward split of the 1-process run, the bytes each rank sent/received per block, and an
on-paper estimate of the speedup on 8 GPUs for Llama-3-8B / 70B shapes from that split.

    python benchmarks/distributed_p1.py --out benchmarks/results/distributed_p1.json
    python benchmarks/distributed_p1.py --num-layers 2 --out /tmp/distributed_p1-2.json  # check
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from babai_ao.calibration import distributed

BLOCK_SHAPES = {  # [rows, cols] of each stage's linears, per block
    "SmolLM2-135M": dict(blocks=30, hidden=576, kv=192, inter=1536),
    "Llama-3-8B": dict(blocks=32, hidden=4096, kv=1024, inter=14336),
    "Llama-3-70B": dict(blocks=80, hidden=8192, kv=1024, inter=28672),
}


def stages(hidden: int, kv: int, inter: int) -> list[list[tuple[int, int]]]:
    """A Llama block's stages, each a list of ``(rows, cols)`` weights: q/k/v, o, gate/up,
    down."""
    return [[(hidden, hidden), (kv, hidden), (kv, hidden)], [(hidden, hidden)],
            [(inter, hidden), (inter, hidden)], [(hidden, inter)]]


def block_params(shape: dict) -> int:
    return sum(r * c for st in stages(shape["hidden"], shape["kv"], shape["inter"])
               for r, c in st)


def solve_work(shape: dict, world: int, split_rows: bool = False) -> float:
    """Σ over stages of the busiest rank's ``rows·cols²`` (``owners``: whole solves spread
    within a stage); ``split_rows``: every solve's rows split evenly over the ranks."""
    total = 0.0
    for st in stages(shape["hidden"], shape["kv"], shape["inter"]):
        costs = [r * c * c for r, c in st]
        if split_rows:
            total += sum(costs) / world
            continue
        load = [0] * world
        for i, r in enumerate(distributed.owners(costs, world)):
            load[r] += costs[i]
        total += max(load)
    return total * shape["blocks"]


def scaling_estimate(forward_s: float, solve_s: float, world: int = 8) -> dict[str, Any]:
    """Speedup on ``world`` devices, from the measured 1-process forward/solve split on
    SmolLM2: forward time scales with parameters (same tokens) and divides by ``world``;
    solve time scales with ``Σ rows·cols²`` and runs as ``solve_work`` says. Communication is
    left out (estimated separately in BENCHMARKS.md)."""
    base = BLOCK_SHAPES["SmolLM2-135M"]
    fwd_unit = forward_s / (block_params(base) * base["blocks"])
    solve_unit = solve_s / solve_work(base, 1)
    out = {}
    for name, shape in BLOCK_SHAPES.items():
        fwd = fwd_unit * block_params(shape) * shape["blocks"]
        one = fwd + solve_unit * solve_work(shape, 1)
        whole = fwd / world + solve_unit * solve_work(shape, world)
        rows = fwd / world + solve_unit * solve_work(shape, world, split_rows=True)
        out[name] = {"solve_share_1proc": solve_unit * solve_work(shape, 1) / one,
                     f"speedup_{world}_whole_solves": one / whole,
                     f"speedup_{world}_rows_split": one / rows}
    return out


def stored_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every stored tensor of the quantized layers (inner tensors of quantized
    weights: packed codes, scales, zeros), in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flatten = getattr(t, "__tensor_flatten__", None)
        parts = [(name, t)] if flatten is None else [(f"{name}:{n}", getattr(t, n))
                                                      for n in flatten()[0]]
        for n, x in parts:
            h.update(n.encode())
            h.update(x.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _run(rank: int, world: int, port: int, threads: int, args: argparse.Namespace,
         results: Any) -> None:
    from babai_ao import babai_config
    from babai_ao.calibration import lockstep
    from babai_ao.calibration.data import calibration_windows
    from babai_ao.calibration.models import load_smollm2
    from babai_ao.calibration.sequential import quantize_model

    torch.set_num_threads(threads)
    if world > 1:
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=7200))
    model, tokenizer = load_smollm2(num_layers=args.num_layers)
    calib = calibration_windows(tokenizer, n=args.calib_n, seq_len=args.calib_len)
    distributed.barrier("start")
    load0 = os.getloadavg()
    in_lockstep = lockstep.BLOCKS_RUN
    t0 = time.perf_counter()
    report = quantize_model(model, babai_config(bits=4, group_size=64, order="act"), calib,
                            batch_size=8, progress=False)
    distributed.barrier("end")
    seconds = time.perf_counter() - t0
    traffic: dict[str, int] = {}
    for t in distributed.LAST_LOG:
        traffic[t.op] = traffic.get(t.op, 0) + t.nbytes
    results.put({"rank": rank, "world": world, "threads": threads, "seconds": seconds,
                 "report_seconds": report.seconds, "solver_seconds": report.solver_seconds,
                 "digest": stored_digest(model), "traffic_bytes": traffic,
                 "blocks": len(model.model.layers),
                 "lockstep_blocks": lockstep.BLOCKS_RUN - in_lockstep,
                 "errors": [r.error for r in report.rows], "load_start": load0,
                 "load_end": os.getloadavg()})
    if world > 1:
        torch.distributed.destroy_process_group()


def run(world: int, threads: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_run, args=(r, world, port, threads, args, results))
             for r in range(world)]
    for p in procs:
        p.start()
    got = [results.get() for _ in procs]
    for p in procs:
        p.join()
    return sorted(got, key=lambda g: g["rank"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--num-layers", type=int, help="first N blocks (default: all 30)")
    p.add_argument("--calib-n", type=int, default=128)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--configs", default="2x1,1x2,1x1",
                   help="which runs, in order (PROCESSESxTHREADS); runs already in --out are "
                        "kept and not repeated: time 2x1,1x2 in a quiet window, 1x1 (codes "
                        "only) later")
    args = p.parse_args()
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, check=False).stdout.strip()
    record: dict[str, Any] = {"protocol": "P1 calibration (babai w4g64 act sequential)",
                              "date": datetime.datetime.now().isoformat(timespec="seconds"),
                              "cpus": os.cpu_count(), "git": git, "torch": torch.__version__,
                              "num_layers": args.num_layers, "calib_n": args.calib_n,
                              "calib_len": args.calib_len}
    blocks = args.num_layers or 30
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict[str, Any]]] = {}
    if out.is_file():  # earlier runs of the same settings are kept
        before = json.loads(out.read_text())
        if all(before.get(k) == record[k] for k in ("num_layers", "calib_n", "calib_len")):
            runs = before.get("runs", {})
            record["earlier_runs"] = {k: before.get("date") for k in runs}
    # 2×1 first (the subject), then 1×2 (the wall-time comparison), then 1×1: LAPACK's fp32
    # Cholesky gives other bits with another thread count, so the codes are compared at one
    # thread per process
    for key in args.configs.split(","):
        if key in runs:
            continue
        world, threads = (int(v) for v in key.split("x"))
        runs[key] = run(world, threads, args)
        print(f"{world} process(es) × {threads} thread(s): {runs[key][0]['seconds']:.1f} s",
              flush=True)
        record["runs"] = runs
        summarize(record, runs, blocks)
        out.write_text(json.dumps(record, indent=1))  # after every run: partial results kept
    print(json.dumps({k: v for k, v in record.items() if k != "runs"}, indent=1))


def summarize(record: dict[str, Any], runs: dict[str, list[dict[str, Any]]],
              blocks: int) -> None:
    """The comparisons that the runs so far allow."""
    if "2x1" not in runs:
        return
    two = runs["2x1"]
    record["ranks_agree"] = two[0]["digest"] == two[1]["digest"]
    record["lockstep_in_every_run"] = all(r["lockstep_blocks"] == r["blocks"]
                                          for rs in runs.values() for r in rs)
    record["bytes_per_block_per_rank"] = [
        {op: b / blocks for op, b in r["traffic_bytes"].items()} for r in two]
    if "1x2" in runs:
        one = runs["1x2"][0]
        record["wall_ratio_1x2_over_2x1"] = one["seconds"] / two[0]["seconds"]
        record["same_codes_1x2_vs_2x1"] = one["digest"] == two[0]["digest"]
        solve, forward = one["solver_seconds"], one["report_seconds"] - one["solver_seconds"]
        record["one_process_2_threads_split"] = {"solve_s": solve, "forward_s": forward}
        record["scaling_estimate_8"] = scaling_estimate(forward, solve)
    if "1x1" in runs:
        record["same_codes_1x1_vs_2x1"] = runs["1x1"][0]["digest"] == two[0]["digest"]
        record["same_errors_1x1_vs_2x1"] = runs["1x1"][0]["errors"] == two[0]["errors"]
        if "1x2" in runs:
            record["same_codes_1x1_vs_1x2"] = (runs["1x1"][0]["digest"]
                                               == runs["1x2"][0]["digest"])

if __name__ == "__main__":
    main()
