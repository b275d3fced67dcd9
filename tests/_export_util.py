"""Shared pieces of the export tests: quantized models and the float-rounding tolerance."""

from __future__ import annotations

import torch

from babai_ao.ao.tensor import BabaiQuantizedTensor
from babai_ao.formats import ssqr

U = 2.0**-24  # float32 unit roundoff
GELU_LIP = 1.13  # max |GELU'(x)| ≈ 1.129


def quantized_weight(w: torch.Tensor, bits: int, group_size: int, *, symmetric: bool = False,
                     outlier_density: float | None = None) -> BabaiQuantizedTensor:
    """RTN on the babai grid, or SSQR (CSR outliers) when ``outlier_density`` is given."""
    w = w.detach().float()
    if outlier_density is None:
        return BabaiQuantizedTensor.from_hp(w, bits=bits, group_size=group_size,
                                            symmetric=symmetric)
    sw = ssqr.quantize(w, None, bits, group_size, outlier_density=outlier_density)
    return BabaiQuantizedTensor.from_quantized(sw, torch.float32)


def quantize_linears(model: torch.nn.Module, bits, group_size: int, **kw) -> torch.nn.Module:
    """Quantize ``model``'s ``nn.Linear``s in place; ``bits`` an int or one per linear."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    widths = [bits] * len(linears) if isinstance(bits, int) else list(bits)
    for mod, b in zip(linears, widths):
        q = quantized_weight(mod.weight, b, group_size, **kw)
        mod.weight = torch.nn.Parameter(q, requires_grad=False)
    return model


def mlp(dims: tuple[int, ...], seed: int = 0) -> torch.nn.Sequential:
    """Linear/GELU chain with the given widths."""
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(torch.nn.GELU())
    return torch.nn.Sequential(*layers).eval()


def rounding_bound(model: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |runtime − eager| for a Linear/GELU chain with the same weights.

    Both sides compute each dot product of length K in float32 in some order, each within
    ``γ_K·(|x|·|W|ᵀ + |b|)`` of the exact value (``γ_K = K·u/(1 − K·u)``), so they differ by
    at most twice that; allowing the runtime its own dequantization rounding (one more
    rounding of each weight) makes it ``γ_{K+2}``. An input error ``e`` grows to ``|W|·e``
    through a linear and to ``1.13·e`` through GELU (its Lipschitz constant), plus GELU's
    own rounding on both sides (8 ulp, generous for erf-based GELU).
    """
    e = torch.zeros_like(x)
    h = x
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            w = layer.weight.dequantize().float() if hasattr(layer.weight, "qdata") \
                else layer.weight.float()
            k = w.shape[1]
            gamma = (k + 2) * U / (1 - (k + 2) * U)
            b = 0 if layer.bias is None else layer.bias.abs()
            e = e @ w.abs().T + 2 * gamma * (h.abs() @ w.abs().T + b)
        else:
            e = GELU_LIP * e + 8 * U * layer(h).abs()
        with torch.no_grad():
            h = layer(h)
    return e


def activation_bound(x: torch.Tensor, row_abs_sums: torch.Tensor, w: torch.Tensor
                     ) -> torch.Tensor:
    """Bound on the 8da4w error of ``x @ Wᵀ`` from int8 per-token activations.

    Per token ``s_x = (max(x, 0) − min(x, 0)) / 255`` and ``|x − x̂| ≤ s_x / 2``, so
    ``|Δy[n]| ≤ s_x/2 · Σ_k |W'[n, k]|`` for the weight ``W'`` that multiplies ``x̂``
    (``row_abs_sums``), plus float rounding (a generous relative 1e-5 of ``|x|·|W|ᵀ``).
    """
    sx = (x.clamp(min=0).amax(-1, keepdim=True) - x.clamp(max=0).amin(-1, keepdim=True)) / 255
    return sx / 2 * row_abs_sums + 1e-5 * (x.abs() @ w.abs().T)


def accounted_bytes(model: torch.nn.Module) -> float:
    """Bits-per-weight accounting: packed codes + fp16 scales + packed zeros + CSR outliers
    of every quantized weight, plus float32 bytes of every other parameter/buffer."""
    total = 0.0
    for mod in model.modules():
        for _name, p in list(mod.named_parameters(recurse=False)) + \
                list(mod.named_buffers(recurse=False)):
            if p is None:
                continue
            if isinstance(p, BabaiQuantizedTensor):
                total += p.nbytes_stored
            else:
                total += p.numel() * 4
    return total


def cut_vocab(model: torch.nn.Module, vocab: int) -> torch.nn.Module:
    """Keep the first ``vocab`` tokens of a tied-embedding causal LM (fast exports in tests)."""
    emb = torch.nn.Embedding(vocab, model.config.hidden_size)
    emb.weight = torch.nn.Parameter(model.model.embed_tokens.weight[:vocab].detach().clone())
    model.model.embed_tokens = emb
    model.lm_head = torch.nn.Linear(model.config.hidden_size, vocab, bias=False)
    model.lm_head.weight = emb.weight
    model.config.vocab_size = vocab
    return model
