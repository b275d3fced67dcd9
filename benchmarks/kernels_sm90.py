"""Static sm_90 (H100/H200) report of every babai Triton kernel × autotune config, compiled
ahead of time on a machine without a GPU (``babai_ao.kernels.aot``): registers, spills,
shared memory, resident warps per SM, and the SASS mix of global loads and tensor-core MMA.

Not a timing: it says which configs can reach the bandwidth roofline at all (no spills,
vectorized code loads, enough resident warps to hide memory latency) before a GPU is lent.

    .venv/bin/python benchmarks/kernels_sm90.py [--bits 4 3] [--dtype bf16] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.pop("TRITON_INTERPRET", None)  # the GPU configs, not the interpreter's one
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from babai_ao.kernels.aot import launches, usage  # noqa: E402
from tqdm import tqdm  # noqa: E402


def _row(bits: int, launch, arch: int) -> dict:
    u = usage(launch.compile(arch), arch)
    code_loads = {op: n for op, n in u.instructions.items() if op.startswith("LDG")}
    return dict(bits=bits, kernel=launch.name, registers=u.registers,
                spill_bytes=u.spill_stores + u.spill_loads, shared_kib=u.shared / 1024,
                warps_per_sm=u.warps_per_sm, ldg=u.count("LDG"),
                ldg_vector=sum(n for op, n in code_loads.items() if ".64" in op or ".128" in op),
                mma=u.count("HMMA") + u.count("HGMMA"), loads=code_loads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--json", help="write the rows here (JSON lines)")
    args = ap.parse_args()

    todo = [(b, la) for b in args.bits for la in launches(b, args.group_size, args.dtype)]
    print(f"# sm_{args.arch} static report — triton {triton.__version__}, "
          f"{platform.node()}, {time.strftime('%Y-%m-%d')}, group {args.group_size}, "
          f"{args.dtype} activations\n")
    print("| bits | kernel (BM×BN×BK×split, warps, stages) | regs | spill B | smem KiB "
          "| warps/SM | LDG | vector LDG | MMA |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for bits, launch in tqdm(todo, desc="compile sm_90", leave=False):
        r = _row(bits, launch, args.arch)
        rows.append(r)
        tqdm.write(f"| {bits} | {r['kernel']} | {r['registers']} | {r['spill_bytes']} | "
                   f"{r['shared_kib']:.0f} | {r['warps_per_sm']} | {r['ldg']} | "
                   f"{r['ldg_vector']} | {r['mma']} |")
    if args.json:
        with open(args.json, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
