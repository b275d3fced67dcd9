"""Random packed layers and the independent reference for the kernel and pass tests."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from babai_ao.formats.packed_weight import dequantize_packed
from babai_ao.formats.packing import pack


def random_layer(bits: int, group_size: int, n: int, k: int, outliers: bool = False,
                 seed: int = 0) -> dict:
    """Keyword arguments of ``babai::linear`` (minus ``x``/``bias``) for random codes."""
    gen = torch.Generator().manual_seed(seed)
    g = k // group_size
    codes = torch.randint(0, 2**bits, (n, k), generator=gen)
    zeros = torch.randint(0, 2**bits, (n, g), generator=gen)
    scales = (torch.rand(n, g, generator=gen) * 0.05 + 0.01).half()
    layer = dict(packed=pack(codes, bits), scales=scales,
                 zeros=pack(zeros.reshape(1, -1), bits).reshape(-1), bits=bits,
                 group_size=group_size, in_features=k)
    if outliers:  # 0..3 distinct columns per row, deltas beyond the grid
        counts = torch.randint(0, 4, (n,), generator=gen)
        ptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32)
        idx = torch.cat([torch.randperm(k, generator=gen)[:c] for c in counts.tolist()])
        val = torch.randint(-40, 40, (int(counts.sum()),), generator=gen).to(torch.int32)
        layer.update(outlier_ptr=ptr, outlier_idx=idx.to(torch.int16), outlier_val=val)
    return layer


def reference(x: torch.Tensor, layer: dict, bias: torch.Tensor | None = None,
              perm: torch.Tensor | None = None) -> torch.Tensor:
    """float32 ``x[..., perm] @ Wᵀ + bias`` from ``dequantize_packed`` (independent path)."""
    w = dequantize_packed(**{k: v for k, v in layer.items()})
    xf = x.float() if perm is None else x.float()[..., perm]
    return torch.nn.functional.linear(xf, w, None if bias is None else bias.float())


def run_compiled_triton(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    """``python argv…`` in a fresh process without ``TRITON_INTERPRET`` (so ``triton.jit``
    makes GPU-compilable functions, not interpreter ones); output captured as text."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(kwargs.pop("env", {}))
    return subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True,
                          timeout=600, **kwargs)
