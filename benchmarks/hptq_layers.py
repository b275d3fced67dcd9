"""HPTQ at 4-bit speed, per layer: one compiled HPTQ linear (``cpu_hptq``: int4pack window
rows + hi rows + sparse scatters) next to a 4-bit g64 int4pack linear of the same shape, and
the same HPTQ layer's int4pack call alone (no correction: the floor), timed side by side in
one process, interleaved.

The HPTQ layers are the real ones of a quantized SmolLM2 (``--model``: a model saved by
``torch.save``, e.g. ``benchmarks/kernels_cpu.py --cache``'s
``smollm2-30-hptq3.3-bfloat16.pt``). Each compiled graph applies the layer to ``--rep``
separate inputs, so the compiled call's fixed cost is shared; each round times ``--inner``
such calls; min and median over ``--rounds`` rounds, in µs per layer call.

    .venv/bin/python benchmarks/hptq_layers.py --model /tmp/kernels_cpu/smollm2-30-hptq3.3-bfloat16.pt \\
        --threads 2 --layers model.layers.0.self_attn.q_proj,model.layers.15.mlp.gate_proj
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn


class _Repeated(nn.Module):
    """``fn(x_i)`` for each of several inputs in one graph (buffers: the layout)."""

    def __init__(self, fn, tensors: dict[str, torch.Tensor], **static):
        super().__init__()
        self.fn, self.static, self.names = fn, static, list(tensors)
        for name, t in tensors.items():
            self.register_buffer(name, t)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        t = {n: getattr(self, n) for n in self.names}
        return [self.fn(x, **t, **self.static) for x in xs]


def _four_bit(x, weight, scale_zero, k):
    x2 = x.reshape(-1, k).to(torch.bfloat16)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, weight, 64, scale_zero).to(x.dtype)


def _window_only(x, weight, scale_zero, scales, k, group):
    x2 = x.reshape(-1, k).to(torch.bfloat16)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, weight, group, scale_zero)
    return (y.float() * scales).to(x.dtype)


def _hptq(x, weight, scale_zero, scales, hi_rows, rows, cols, val, k, group):
    from babai_ao.kernels import cpu_hptq

    return cpu_hptq.linear(x, weight, scale_zero, scales, hi_rows, rows, cols, val, None,
                           group, k)


def variants(codes: torch.Tensor, scale: torch.Tensor) -> dict[str, nn.Module]:
    from babai_ao.kernels import cpu_hptq

    n, k = codes.shape
    gen = torch.Generator().manual_seed(0)
    q4 = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 1)
    sz4 = torch.randn(k // 64, n, 2, generator=gen).to(torch.bfloat16)
    layout = cpu_hptq.build_layout(codes, scale, max_sparse_fraction=1.0)
    weight, sz, scales, hi, rows, cols, val = layout
    group = k // sz.shape[0]
    window = cpu_hptq.build_layout(codes, scale, max_sparse_fraction=1.0, heavy=0)
    tag = f"{hi.numel()} hi rows, {int((val != 0).sum())} entries ({val.numel()} padded)"
    return {
        "4-bit g64 int4pack": _Repeated(_four_bit, {"weight": w4, "scale_zero": sz4}, k=k),
        f"HPTQ window rows only (g{group}, no correction)": _Repeated(
            _window_only, {"weight": window[0], "scale_zero": window[1], "scales": scales},
            k=k, group=group),
        f"HPTQ int4pack + {tag}": _Repeated(
            _hptq, {"weight": weight, "scale_zero": sz, "scales": scales, "hi_rows": hi,
                    "rows": rows, "cols": cols, "val": val}, k=k, group=group),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="a torch.save'd HPTQ-quantized model")
    p.add_argument("--layers", default="model.layers.0.self_attn.q_proj,"
                   "model.layers.15.mlp.gate_proj,model.layers.1.mlp.down_proj")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--rep", type=int, default=8)
    p.add_argument("--inner", type=int, default=3)
    p.add_argument("--rounds", type=int, default=300)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 1000
    model = torch.load(args.model, weights_only=False)
    modules = dict(model.named_modules())
    dtype = getattr(torch, args.dtype)
    timed = {}
    with torch.no_grad():
        for name in args.layers.split(","):
            w = modules[name].weight
            for label, mod in variants(w.codes().long(), w.scale).items():
                xs = [torch.randn(1, 1, w.shape[1], dtype=dtype) for _ in range(args.rep)]
                fn = torch.compile(mod, fullgraph=True, dynamic=False)
                fn(xs)
                timed[f"{name} | {label}"] = (fn, xs, [])
        for _ in range(args.rounds):
            for fn, xs, out in timed.values():
                t0 = time.perf_counter()
                for _ in range(args.inner):
                    fn(xs)
                out.append((time.perf_counter() - t0) / (args.inner * args.rep) * 1e6)
    print(f"threads {args.threads}, {args.dtype} activations, load {os.getloadavg()[0]:.1f}, "
          f"torch {torch.__version__}")
    print("| layer | variant | µs min | µs median | 4-bit / this (min) | (median) |")
    print("|---|---|---|---|---|---|")
    base = None
    for key, (_, _, ts) in timed.items():
        name, label = key.split(" | ")
        if label.startswith("4-bit"):
            base = ts
        print(f"| {name.removeprefix('model.layers.')} | {label} | {min(ts):.1f} | "
              f"{statistics.median(ts):.1f} | {min(base) / min(ts):.3f} | "
              f"{statistics.median(base) / statistics.median(ts):.3f} |")


if __name__ == "__main__":
    main()
