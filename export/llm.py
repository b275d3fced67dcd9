"""Decoder LMs with a static KV cache, exported for token-by-token greedy decoding.

ExecuTorch: transformers' ``TorchExportableModuleWithStaticCache`` — the cache lives in
mutable buffers of the program, the method is called with ``(input_ids [1, 1],
cache_position [1])`` and returns logits [1, 1, V]; the runtime keeps the cache between calls.

ONNX has no state, so :class:`ExplicitCacheLM` passes the cache through: inputs
``(input_ids, cache_position, k_0, v_0, …, k_{L−1}, v_{L−1})``, outputs
``(logits, k_0', v_0', …)`` with every ``k_i, v_i`` of shape [1, heads, max_cache_len, d].
Both write position ``p`` of the cache and attend over ``[0, p]`` (the static cache's mask).
"""

from __future__ import annotations

from pathlib import Path

import torch

from babai_ao.errors import BabaiError

from .modules import plain_buffers


def _decode_inputs(device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.zeros(1, 1, dtype=torch.long, device=device),
            torch.zeros(1, dtype=torch.long, device=device))


def static_cache_module(model: torch.nn.Module, max_cache_len: int) -> torch.nn.Module:
    """transformers' exportable static-cache wrapper around a causal LM (batch 1)."""
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    model.generation_config.use_cache = True
    model.generation_config.cache_implementation = "static"
    return TorchExportableModuleWithStaticCache(model, batch_size=1,
                                                max_cache_len=max_cache_len).eval()


def cache_shape(model: torch.nn.Module, max_cache_len: int) -> tuple[int, int, int, int]:
    """``[1, kv_heads, max_cache_len, head_dim]`` of one layer's key (or value) cache."""
    cfg = model.config.get_text_config()
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return (1, heads, max_cache_len, head_dim)


class ExplicitCacheLM(torch.nn.Module):
    """A causal LM step with its static cache as explicit inputs and outputs (module doc)."""

    def __init__(self, model: torch.nn.Module, max_cache_len: int):
        super().__init__()
        from transformers import StaticCache

        self.model = model
        cfg = model.config.get_text_config()
        self.num_layers = cfg.num_hidden_layers
        self.cache = StaticCache(max_cache_len=max_cache_len, config=cfg)
        _, heads, _, head_dim = cache_shape(model, max_cache_len)
        self.cache.early_initialization(1, heads, head_dim, model.dtype, model.device)

    def empty_cache(self) -> list[torch.Tensor]:
        layer = self.cache.layers[0]
        return [torch.zeros_like(layer.keys) for _ in range(2 * self.num_layers)]

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor,
                *kv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(kv) != 2 * self.num_layers:
            raise BabaiError(f"expected {2 * self.num_layers} cache tensors (k, v per layer), "
                             f"got {len(kv)}: pass ExplicitCacheLM.empty_cache() first")
        for i, layer in enumerate(self.cache.layers):
            layer.keys, layer.values = kv[2 * i].clone(), kv[2 * i + 1].clone()
            layer.cumulative_length = cache_position[0].clone()
        logits = self.model(input_ids=input_ids, past_key_values=self.cache,
                            use_cache=True).logits
        return (logits, *(t for layer in self.cache.layers for t in (layer.keys, layer.values)))


def export_llm_executorch(model: torch.nn.Module, path: str | Path, max_cache_len: int = 64,
                          mode: str = "weight_only", xnnpack: bool = True) -> Path:
    """A ``.pte`` whose ``forward(input_ids [1, 1], cache_position [1])`` returns logits."""
    from .executorch import lower

    wrapper = static_cache_module(model, max_cache_len)
    ids, pos = _decode_inputs(model.device)
    with torch.no_grad(), plain_buffers(wrapper):
        # strict: non-strict tracing of the cache wrapper fails in run_decompositions (torch 2.13)
        ep = torch.export.export(wrapper, (), {"input_ids": ids, "cache_position": pos},
                                 strict=True)
    program = lower(ep, mode, init_buffers=("key_cache", "value_cache"), xnnpack=xnnpack)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(program.buffer)
    return path


def export_llm_onnx(model: torch.nn.Module, path: str | Path, max_cache_len: int = 64,
                    format: str = "qdq", accuracy_level: int = 1) -> Path:
    """An ``.onnx`` step ``(input_ids, cache_position, k_0, v_0, …) → (logits, k_0', …)``."""
    from .onnx import export_onnx_program

    wrapper = ExplicitCacheLM(model, max_cache_len).eval()
    kv = wrapper.empty_cache()
    names = ["input_ids", "cache_position"] + [f"{t}_{i}" for i in range(wrapper.num_layers)
                                               for t in ("key", "value")]
    outs = ["logits"] + [f"{n}_out" for n in names[2:]]
    with torch.no_grad(), plain_buffers(wrapper):
        ep = torch.export.export(wrapper, (*_decode_inputs(model.device), *kv), strict=False)
    return export_onnx_program(ep, path, format, accuracy_level, input_names=names,
                               output_names=outs)
