"""Where a compiled CPU decode step spends its time, per op: ``torch.profiler`` over greedy
decoding of SmolLM2 (static KV cache, the ``benchmarks/kernels_cpu.py --cache`` models after
``prepare_cpu``), the top ops by self CPU time, for several variants side by side. This is
how the HPTQ C++ op's last gap was found: the op itself was faster than int4pack, but
dynamo's guard evaluation (``TorchDynamo Cache Lookup``) grew with the seven layout tensors
per layer (BENCHMARKS.md, "HPTQ on CPU in one C++ op").

    .venv/bin/python benchmarks/profile_decode_cpu.py --cache /tmp/kernels_cpu \\
        --variants w4g64,hptq3.3 --tokens 32
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def decode(step, tokens: int) -> None:
    """Greedy decoding of ``tokens`` tokens through a compiled static-cache step."""
    tok = 1
    for pos in range(tokens):
        logits = step(input_ids=torch.tensor([[tok]]), cache_position=torch.tensor([pos]))
        tok = int(logits[0, -1].argmax())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", required=True, help="kernels_cpu.py's --cache directory")
    p.add_argument("--variants", default="w4g64,hptq3.3",
                   help="comma-separated: the smollm2-30-<variant>-bfloat16.pt files")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=8, help="ops listed per variant")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from babai_ao.export.llm import static_cache_module

    from babai_ao import prepare_cpu

    for name in args.variants.split(","):
        model = torch.load(Path(args.cache) / f"smollm2-30-{name}-bfloat16.pt",
                           weights_only=False)
        with torch.no_grad():
            prepare_cpu(model)
            step = torch.compile(static_cache_module(model, args.tokens))

            decode(step, args.tokens)
            decode(step, args.tokens)  # compiled and warm
            t = time.perf_counter()
            decode(step, args.tokens)
            ms = (time.perf_counter() - t) / args.tokens * 1e3
            with torch.profiler.profile() as prof:
                decode(step, args.tokens)
        print(f"\n{name}: {ms:.2f} ms/token")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
