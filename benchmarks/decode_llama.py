"""Compiled decode tokens/s of a Llama-shaped model with random weights: bf16 vs 4-bit.

Needs torch + triton only (no transformers, torchao or executorch), so it runs on the lent
GPU's stack. The model is a minimal Llama (RMSNorm, RoPE, grouped-query attention over a
static KV cache, SwiGLU MLP); "4-bit" replaces every block linear by ``PackedLinear``
(round-to-nearest on the babai grid, asymmetric, group 128), whose forward is
``babai::linear`` — the Triton fused dequant-matmul on CUDA. Each variant decodes
``--tokens`` tokens one at a time through ``torch.compile`` (greedy on random logits: speed
only), timed after a warm-up, side by side in one process.

    python benchmarks/decode_llama.py --config 1b [--config 3b] [--tokens 128] [--json out.json]
    python benchmarks/decode_llama.py --config tiny --device cpu --tokens 8   # smoke run
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

CONFIGS = {  # Llama-3.2-1B / -3B shapes; "tiny" for smoke runs
    "1b": dict(dim=2048, layers=16, heads=32, kv_heads=8, hidden=8192, vocab=128256),
    "3b": dict(dim=3072, layers=28, heads=24, kv_heads=8, hidden=8192, vocab=128256),
    "tiny": dict(dim=256, layers=2, heads=4, kv_heads=2, hidden=512, vocab=1024),
}


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, max_seq: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        cache = torch.zeros(1, kv_heads, max_seq, self.head_dim)
        self.register_buffer("k_cache", cache.clone(), persistent=False)
        self.register_buffer("v_cache", cache.clone(), persistent=False)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        q = self.q_proj(x).view(1, 1, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(1, 1, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(1, 1, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate(q, rope), rotate(k, rope)
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache.index_copy_(2, pos, v)
        mask = (torch.arange(self.k_cache.shape[2], device=x.device) <= pos).view(1, 1, 1, -1)
        out = nn.functional.scaled_dot_product_attention(
            q, self.k_cache, self.v_cache, attn_mask=mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(1, 1, -1))


def rotate(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """RoPE: rotate pairs (x₁, x₂) of the head dim by the position's angles (cos, sin)."""
    x1, x2 = x.float().chunk(2, -1)
    cos, sin = rope.unbind(-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


class Block(nn.Module):
    def __init__(self, c: dict, max_seq: int):
        super().__init__()
        self.attn_norm, self.mlp_norm = nn.RMSNorm(c["dim"]), nn.RMSNorm(c["dim"])
        self.attn = Attention(c["dim"], c["heads"], c["kv_heads"], max_seq)
        self.gate_proj = nn.Linear(c["dim"], c["hidden"], bias=False)
        self.up_proj = nn.Linear(c["dim"], c["hidden"], bias=False)
        self.down_proj = nn.Linear(c["hidden"], c["dim"], bias=False)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), pos, rope)
        h = self.mlp_norm(x)
        return x + self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


class Llama(nn.Module):
    def __init__(self, c: dict, max_seq: int):
        super().__init__()
        self.embed = nn.Embedding(c["vocab"], c["dim"])
        self.blocks = nn.ModuleList(Block(c, max_seq) for _ in range(c["layers"]))
        self.norm = nn.RMSNorm(c["dim"])
        self.output = nn.Linear(c["dim"], c["vocab"], bias=False)
        half = c["dim"] // c["heads"] // 2
        freqs = 1.0 / 500000 ** (torch.arange(half) / half)
        angles = torch.outer(torch.arange(max_seq).float(), freqs)
        self.register_buffer("rope", torch.stack([angles.cos(), angles.sin()], -1),
                             persistent=False)

    def forward(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = self.embed(tok)
        rope = self.rope[pos]
        for block in self.blocks:
            x = block(x, pos, rope)
        return self.output(self.norm(x))


def decode_speed(model: nn.Module, tokens: int, device: str) -> float:
    """Tokens/s of greedy decoding ``tokens`` steps through the compiled step."""
    step = torch.compile(model, fullgraph=True)

    def run() -> None:
        tok = torch.zeros(1, 1, dtype=torch.long, device=device)
        for i in range(tokens):
            pos = torch.tensor([i], device=device)
            tok = step(tok, pos)[..., -1, :].argmax(-1, keepdim=True)
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        run()  # compile + warm-up
        t0 = time.perf_counter()
        run()
        return tokens / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", action="append", choices=list(CONFIGS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--json")
    args = p.parse_args()
    from babai_ao.kernels.module import pack_linears

    rows = []
    for name in args.config or ["1b"]:
        torch.manual_seed(0)
        with torch.device(args.device):
            model = Llama(CONFIGS[name], args.tokens).to(torch.bfloat16)
        for block in model.blocks:  # random weights at a realistic scale
            for lin in (m for m in block.modules() if isinstance(m, nn.Linear)):
                nn.init.normal_(lin.weight, std=0.02)
        bf16 = decode_speed(model, args.tokens, args.device)
        packed = pack_linears(model, bits=4, group_size=args.group_size, skip=("output",))
        four = decode_speed(model, args.tokens, args.device)
        row = {"config": name, "device": args.device, "tokens": args.tokens,
               "bf16_tok_s": bf16, "babai4_tok_s": four, "speedup": four / bf16,
               "packed_linears": packed, "torch": torch.__version__}
        if args.device == "cuda":
            row["gpu"] = torch.cuda.get_device_name()
        rows.append(row)
        print(f"{name}: bf16 {bf16:.1f} tok/s, babai 4-bit g{args.group_size} {four:.1f} tok/s "
              f"({four / bf16:.2f}x), {packed} packed linears", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
