"""Every babai Triton kernel compiles for a real GPU target (sm_90: H100/H200) on this CPU
machine: TTIR → PTX → cubin through Triton's NVIDIA backend and its bundled ptxas, no driver
(``babai_ao.kernels.aot``). The interpreter runs the kernels' Python, not their compilation:
a construct the GPU compiler rejects (a non-constexpr global read inside ``@triton.jit``,
say) passes every interpreter test and fails here.

Runs in a fresh process without ``TRITON_INTERPRET`` (under it ``triton.jit`` makes
interpreter functions, which do not compile). One autotune config per kernel and bit width.
"""

from __future__ import annotations

import json

import pytest
from _kernels_util import run_compiled_triton

_SCRIPT = """
import json, sys
from babai_ao.kernels.aot import launches, usage
bits = int(sys.argv[1])
seen, rows = set(), []
for launch in launches(bits, group_size=64, dtype="bf16"):
    kind = launch.name.split()[0]
    if kind in seen:
        continue
    seen.add(kind)
    u = usage(launch.compile(90), 90)
    rows.append(dict(kernel=launch.name, registers=u.registers, mma=u.count("HMMA") + u.count("HGMMA"),
                     ldg=u.count("LDG"), warps_per_sm=u.warps_per_sm))
print(json.dumps(rows))
"""


@pytest.mark.parametrize("bits", [3, 4])
def test_every_kernel_compiles_for_sm90(bits, tmp_path):
    # cwd elsewhere: ``-c`` puts the cwd first on sys.path, and a checkout's babai_ao/ lacks
    # the babai_ao.kernels that installing maps in
    proc = run_compiled_triton(["-c", _SCRIPT, str(bits)], cwd=tmp_path,
                               env={"TRITON_DEFAULT_FP_FUSION": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["kernel"].split()[0]: r for r in json.loads(proc.stdout.splitlines()[-1])}
    assert set(rows) == {"decode", "prefill", "dequant", "outlier", "huffman", "hptq"}
    for r in rows.values():
        assert 0 < r["registers"] <= 255 and r["ldg"] > 0 and r["warps_per_sm"] > 0, r
    # the bf16 dequant-matmuls run on tensor cores (mma.sync / Hopper wgmma), not on FMAs
    assert rows["decode"]["mma"] > 0 and rows["prefill"]["mma"] > 0, rows
