"""Quantized stand-ins for export tests: modules that call ``babai::linear`` directly."""

from __future__ import annotations

import torch

import babai_ao.ops  # noqa: F401  (registers babai::linear)
from babai_ao.grid import Grid
from babai_ao.packing import pack


class PackedLinear(torch.nn.Module):
    """A linear layer stored in the babai packed format (codes, flat zeros, CSR outliers)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, bits: int,
                 group_size: int, symmetric: bool = False, outlier_shrink: float = 1.0):
        super().__init__()
        n, k = weight.shape
        grid = Grid(bits=bits, symmetric=symmetric, clip=outlier_shrink == 1.0)
        wg = weight.detach().float().reshape(n * k // group_size, group_size)
        scale, zero = grid.fit(wg)
        scale = grid.storable(scale * outlier_shrink)
        codes = grid.round(wg, scale[:, None], zero[:, None]).reshape(n, k)
        clamped = codes.clamp(0, grid.maxq)
        delta = (codes - clamped).to(torch.int32)
        self.bits, self.group_size, self.in_features = bits, group_size, k
        self.register_buffer("packed", pack(clamped.to(torch.int32), bits))
        self.register_buffer("scales", scale.reshape(n, -1).to(torch.float16))
        self.register_buffer("zeros", pack(zero.to(torch.int32).reshape(1, -1), bits).reshape(-1))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        if outlier_shrink != 1.0:
            nz = delta.nonzero()
            ptr = torch.zeros(n + 1, dtype=torch.int32)
            ptr[1:] = torch.cumsum(torch.bincount(nz[:, 0], minlength=n), 0)
            self.register_buffer("outlier_ptr", ptr)
            self.register_buffer("outlier_idx", nz[:, 1].to(torch.int16))
            self.register_buffer("outlier_val", delta[nz[:, 0], nz[:, 1]].to(torch.int8))
        else:
            self.outlier_ptr = self.outlier_idx = self.outlier_val = None

    @property
    def nnz(self) -> int:
        return 0 if self.outlier_idx is None else int(self.outlier_idx.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.babai.linear(x, self.packed, self.scales, self.zeros, self.bias,
                                      self.bits, self.group_size, self.in_features,
                                      self.outlier_ptr, self.outlier_idx, self.outlier_val)


def quantize_linears(model: torch.nn.Module, bits: int, group_size: int, **kw) -> torch.nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a ``PackedLinear``."""
    for name, child in list(model.named_children()):
        if isinstance(child, torch.nn.Linear):
            setattr(model, name, PackedLinear(child.weight, child.bias, bits, group_size, **kw))
        else:
            quantize_linears(child, bits, group_size, **kw)
    return model


def mlp(seed: int = 0, dims: tuple[int, ...] = (64, 128, 32)) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers += [torch.nn.Linear(a, b)] + ([torch.nn.GELU()] if i < len(dims) - 2 else [])
    return torch.nn.Sequential(*layers).eval()


def cut_vocab(model: torch.nn.Module, vocab: int) -> torch.nn.Module:
    """Keep the first ``vocab`` tokens of a tied-embedding causal LM (fast exports in tests)."""
    emb = torch.nn.Embedding(vocab, model.config.hidden_size)
    emb.weight = torch.nn.Parameter(model.model.embed_tokens.weight[:vocab].detach().clone())
    model.model.embed_tokens = emb
    model.lm_head = torch.nn.Linear(model.config.hidden_size, vocab, bias=False)
    model.lm_head.weight = emb.weight
    model.config.vocab_size = vocab
    return model
