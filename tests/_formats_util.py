"""Shared inputs for the no-clipping format tests: random problems and real SmolLM2 layers."""

from __future__ import annotations

import functools
import os
import tempfile

import torch
from safetensors.torch import save_file

from babai_ao.lattice.hessian import HessianAccumulator

# indices into real_layers(): q, o, down of block 0; v, up of block 1
REAL_LAYERS = (0, 3, 6, 9, 12)


def random_problem(n: int, k: int, seed: int, outlier_frac: float = 0.003
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Heavy-tailed weight [n, k] and a correlated, ill-conditioned Hessian [k, k]."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * (0.5 + torch.rand(n, 1, generator=gen))
    w[torch.rand(n, k, generator=gen) < outlier_frac] *= 10
    mix = torch.eye(k) + 0.5 * torch.randn(k, k, generator=gen) / k**0.5
    x = torch.randn(4 * k, k, generator=gen) * torch.logspace(0, 1.5, k)
    x = x @ mix
    return w, x.T @ x


@functools.lru_cache(maxsize=1)
def real_layers() -> tuple[tuple[str, torch.Tensor, torch.Tensor], ...]:
    """``(name, weight, H)`` for every linear of SmolLM2's first two decoder blocks.

    ``H`` from 4 P1 calibration windows cut to 256 tokens (a few seconds on 2 cores).
    """
    from babai_ao.calibration.data import calibration_windows
    from babai_ao.calibration.models import load_smollm2

    model, tok = load_smollm2(num_layers=2)
    ids = calibration_windows(tok, n=4)[:, :256]
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and n.startswith("model.layers.")}
    accs = {n: HessianAccumulator(m.in_features) for n, m in linears.items()}
    handles = [m.register_forward_pre_hook(lambda _m, a, n=n: accs[n].add(a[0]))
               for n, m in linears.items()]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return tuple((n, m.weight.detach().clone(), accs[n].hessian) for n, m in linears.items())


def safetensors_payload(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of a saved safetensors file minus its header (8-byte length + JSON)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "layer.safetensors")
        save_file({k: v.contiguous() for k, v in tensors.items()}, path)
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
        return os.path.getsize(path) - 8 - header_len
