"""llama.cpp interop check (not CI): our GGUF run by llama.cpp vs our eager model.

Quantizes SmolLM2 (round-to-nearest on the GGUF grid: 4 bit, groups of 32, symmetric →
Q4_0, or ``--asymmetric`` → Q4_1 with exact offsets), writes it with
``babai_ao.checkpoints.gguf.save_gguf``, then runs the file in llama.cpp through
llama-cpp-python (a separate venv: ``--llama-python``) and compares greedy tokens from the
same prompt ids, the tokenizer's ids for the prompt, and the logits of the prompt's last
position. Usage (from the repository root)::

    python3.11 -m venv .venv-llama && .venv-llama/bin/pip install llama-cpp-python
    .venv/bin/python benchmarks/gguf_llamacpp.py --llama-python .venv-llama/bin/python
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "The capital of France is"


def llama_side(path: str, prompt_ids: list[int], new_tokens: int) -> dict:
    """Run in the llama-cpp-python venv: greedy tokens and last-position logits."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=256, logits_all=True, verbose=False, seed=0)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=False)
    llm.reset()
    llm.eval(prompt_ids)
    first = np.array(llm.scores[len(prompt_ids) - 1], dtype=np.float32)
    out: list[int] = []
    for _ in range(new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return {"tokenized": ids, "tokens": out, "first_logits": first.tolist()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama-python", default=".venv-llama/bin/python")
    p.add_argument("--asymmetric", action="store_true", help="Q4_1 instead of Q4_0")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--num-layers", type=int, help="first N blocks only (default: all 30)")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--llama-side", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.llama_side:
        path, ids, n = args.llama_side
        print(json.dumps(llama_side(path, json.loads(ids), int(n))))
        return 0

    import torch
    from torchao.quantization import quantize_

    from babai_ao import babai_config, load_smollm2
    from babai_ao.checkpoints.gguf import save_gguf

    model, tokenizer = load_smollm2(num_layers=args.num_layers)
    sym = not args.asymmetric
    quantize_(model, babai_config(bits=4, group_size=32, symmetric=sym, exact_offset=not sym))
    ids = tokenizer(PROMPT).input_ids
    with torch.no_grad():
        ours = model.generate(torch.tensor([ids]), max_new_tokens=args.new_tokens,
                              do_sample=False)[0, len(ids):].tolist()
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    with tempfile.TemporaryDirectory() as tmp:
        path = save_gguf(model, Path(tmp) / "smollm2.gguf")
        t0 = time.perf_counter()
        run = subprocess.run([args.llama_python, __file__, "--llama-side", str(path),
                              json.dumps(ids), str(args.new_tokens)],
                             capture_output=True, text=True, check=True)
        seconds = time.perf_counter() - t0
    theirs = json.loads(run.stdout.strip().splitlines()[-1])
    diff = float((torch.tensor(theirs["first_logits"]) - logits).abs().max())
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs["tokens"])) if a != b),
                len(ours))
    result = {
        "format": "Q4_0" if sym else "Q4_1", "num_layers": args.num_layers or 30,
        "prompt": PROMPT, "tokenizer_ids_match": theirs["tokenized"] == ids,
        "greedy_tokens_match": f"{same}/{len(ours)}", "max_abs_logit_diff_last_prompt_pos": diff,
        "ours": tokenizer.decode(ours), "llama_cpp": tokenizer.decode(theirs["tokens"]),
        "llama_cpp_seconds": round(seconds, 1)}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
