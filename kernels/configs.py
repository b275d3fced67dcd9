"""Autotune search spaces; a single small config under ``TRITON_INTERPRET=1`` (CPU tests)."""

from __future__ import annotations

import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _cfg(warps: int = 4, stages: int = 3, **meta: int) -> triton.Config:
    return triton.Config(meta, num_warps=warps, num_stages=stages)


def decode_configs() -> list[triton.Config]:
    """Few output rows (M ≤ 16): wide K tiles, split-K to fill the SMs."""
    if INTERPRET:
        return [_cfg(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=2)]
    return [_cfg(w, s, BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk)
            for bn in (32, 64, 128) for bk in (32, 64, 128, 256) for sk in (1, 2, 4, 8)
            for w, s in ((4, 3),) if bn * bk <= 16384] + [
            _cfg(8, 4, BLOCK_M=16, BLOCK_N=128, BLOCK_K=bk, SPLIT_K=sk)
            for bk in (64, 128) for sk in (1, 4)]


def whole_groups(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Autotune pruning: keep the K tiles that lie inside one scale group (``GROUP % BLOCK_K
    == 0``), where the kernel scales a whole tile after the dot instead of every element;
    all configs when the group size admits none (e.g. 48)."""
    group = kwargs.get("GROUP", named_args.get("GROUP"))
    inside = [c for c in configs if group % c.kwargs["BLOCK_K"] == 0]
    return inside or configs


def prefill_configs() -> list[triton.Config]:
    """Tiled GEMM for M > 16."""
    if INTERPRET:
        return [_cfg(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, SPLIT_K=1)]
    tiles = ((64, 64, 64, 4, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
             (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 64, 128, 4, 3),
             (64, 64, 32, 4, 4), (128, 128, 32, 8, 4))
    return [_cfg(w, s, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=1)
            for bm, bn, bk, w, s in tiles]


def elementwise_configs() -> list[triton.Config]:
    """2-D tiles for the standalone dequant kernel."""
    if INTERPRET:
        return [_cfg(BLOCK_N=16, BLOCK_K=64)]
    return [_cfg(4, 2, BLOCK_N=bn, BLOCK_K=bk) for bn in (16, 32, 64) for bk in (128, 256)]
