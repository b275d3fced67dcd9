"""Where HPTQ's CPU decode time goes, layer by layer (issue 23.2): compiled M = 1 linears of
SmolLM2-135M, bf16 activations, each output fed to a pointwise consumer (``silu(y) + r``, as
in a decoder) so a post-op that fuses into it costs nothing extra. One compiled graph applies
all 30 blocks' layers of one kind (q/k/v/o/gate/up/down) to one input; µs per layer, best of
``--rounds`` interleaved rounds. Variants:

- ``4-bit``: our w4g64 layer (``_weight_int4pack_mm_for_cpu``, scales in the kernel);
- ``HPTQ``: the default HPTQ CPU form (``kernels/cpu_hptq.py``: one ``babai_cpu::hptq_linear``
  call — window nibbles, hi rows for the rows with the most off-window codes, the sparse
  ``Δ``, ``·s`` and the cast in one C++ kernel; until 2026-12-05 the int4pack kernel followed
  by an fp32 post-op kernel);
- ``… prepare_cpu``: the same after ``prepare_cpu`` (plain kernel modules instead of tensor
  subclasses: no per-call unwrapping of the subclass' inner tensors).

The models are the ``--cache`` files of ``benchmarks/kernels_cpu.py`` (bf16 SmolLM2, w4g64
and HPTQ 3.3 bits: ``kernels_cpu.py --cache DIR --build-cache --only "bf16 model"``):

    .venv/bin/python benchmarks/hptq_cpu_layers.py --cache /tmp/kernels_cpu --rounds 3
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch
from torch import nn

KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class AllLayers(nn.Module):
    """``[silu(layer(x)) + r for layer in layers]``: the layers' outputs through a consumer."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, r: torch.Tensor) -> list[torch.Tensor]:
        return [torch.nn.functional.silu(y) + r[..., :y.shape[-1]]
                for y in (layer(x) for layer in self.layers)]


def _prepared(layers: list[nn.Module]) -> AllLayers:
    """``prepare_cpu`` on copies of the layers: plain kernel modules, no tensor subclass."""
    from babai_ao import prepare_cpu

    graph = copy.deepcopy(AllLayers(layers))
    prepare_cpu(graph)
    return graph


def _layer(model: nn.Module, block: int, kind: str) -> nn.Module:
    m = model.model.layers[block]
    for part in kind.split("."):
        m = getattr(m, part)
    return m


def _us_per_layer(fn, x, r, layers: int, reps: int) -> float:
    for _ in range(10):
        fn(x, r)
    t = time.perf_counter()
    for _ in range(reps):
        fn(x, r)
    return (time.perf_counter() - t) / reps / layers * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", required=True, help="kernels_cpu.py's --cache directory")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    # every variant and kind compiles AllLayers.forward anew: past dynamo's default limit of
    # 8 entries per code object the later graphs would silently run eagerly
    torch._dynamo.config.recompile_limit = 64
    cache = Path(args.cache)
    w4 = torch.load(cache / "smollm2-30-w4g64-bfloat16.pt", weights_only=False)
    hp = torch.load(cache / "smollm2-30-hptq3.3-bfloat16.pt", weights_only=False)
    blocks = len(hp.model.layers)
    rows = []
    for kind in args.kinds.split(","):
        hptq = [_layer(hp, b, kind) for b in range(blocks)]
        from babai_ao.kernels.cpu_hptq import layout_parts

        layouts = [layout_parts(h.weight.cpu_layout(build=True)[0]) for h in hptq]
        k = hptq[0].in_features
        w4_layers = [_layer(w4, b, kind) for b in range(blocks)]
        graphs = {
            "4-bit": AllLayers(w4_layers),
            "HPTQ": AllLayers(hptq),
            "4-bit prepare_cpu": _prepared(w4_layers),
            "HPTQ prepare_cpu": _prepared(hptq),
        }
        compiled = {name: torch.compile(g) for name, g in graphs.items()}
        x = torch.randn(1, 1, k, dtype=torch.bfloat16)
        r = torch.randn(1, 1, hptq[0].out_features, dtype=torch.bfloat16)
        best = dict.fromkeys(compiled, float("inf"))
        with torch.no_grad():
            for _ in range(args.rounds):
                for name, fn in compiled.items():
                    best[name] = min(best[name], _us_per_layer(fn, x, r, blocks, args.reps))
        n = hptq[0].out_features
        hi = sum(t["hi_count"] for t in layouts) / (n * blocks)
        groups = sorted({k // t["groups"] for t in layouts})
        sparse = sum(t["entries"] for t in layouts) / blocks
        row = {"kind": kind, "shape": f"{k}→{n}", "hi_rows_share": hi,
               "groups": groups,
               "sparse_entries_per_layer": sparse, **{f"us_{n_}": v for n_, v in best.items()}}
        rows.append(row)
        print(f"{kind:18s} {k:5d}→{n:<5d} hi rows +{hi:5.1%} g{groups} sparse {sparse:4.0f}/layer  "
              + "  ".join(f"{name} {v:5.1f}" for name, v in best.items())
              + f"  (4-bit/HPTQ {best['4-bit'] / best['HPTQ']:.2f}, prepared "
              f"{best['4-bit prepare_cpu'] / best['HPTQ prepare_cpu']:.2f})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "threads": args.threads,
            "machine": platform.machine(), "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
