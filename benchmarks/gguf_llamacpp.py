"""llama.cpp interop check (not CI): our GGUF run by llama.cpp vs our eager model.

Quantizes SmolLM2 (round-to-nearest on the GGUF grid: 4 bit, groups of 32, symmetric →
Q4_0, or ``--asymmetric`` → Q4_1 with exact offsets), writes it with
``babai_ao.checkpoints.gguf.save_gguf``, then runs the file in llama.cpp through
llama-cpp-python (a separate venv: ``--llama-python``) and compares greedy tokens from the
same prompt ids, the tokenizer's ids for the prompt, the logits of the prompt's last
position, and the logits at every position of prompt + our greedy tokens (teacher-forced,
so one early different token does not hide the rest).

``--float-check`` adds two rows that take llama.cpp's float matmul instead of its
8-bit-activation one: the same quantized model written with ``mode="f32"`` (our dequantized
weights as F32), and the float model (no quantization) as F32 against transformers.

``--gguf FILE`` (repeatable) runs given GGUF files instead — the Babai Q4_K export
(``benchmarks/gguf_q4k_p1.py --babai --keep``), llama.cpp's own Q4_K — each against the
eager model transformers reads from that same file (gguf-py's dequantization: for our
files exactly our model's weights, ``tests/test_gguf.py``); with ``--float-check`` also
those weights as F32. Usage (from the repository root)::

    python3.11 -m venv .venv-llama && .venv-llama/bin/pip install llama-cpp-python
    .venv/bin/python benchmarks/gguf_llamacpp.py --llama-python .venv-llama/bin/python \\
        --float-check
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "The capital of France is"


def llama_side(path: str, prompt_ids: list[int], forced: list[int], new_tokens: int,
               logits_out: str) -> dict:
    """Run in the llama-cpp-python venv: greedy tokens from ``prompt_ids``, and the logits
    of ``prompt_ids + forced`` (saved to ``logits_out``, float32 ``[positions, vocab]``)."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=256, logits_all=True, verbose=False, seed=0)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=False)
    llm.reset()
    llm.eval(prompt_ids + forced)
    np.save(logits_out, np.array(llm.scores[:llm.n_tokens], dtype=np.float32))
    llm.reset()
    llm.eval(prompt_ids)
    out: list[int] = []
    for _ in range(new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return {"tokenized": ids, "tokens": out}


def compare(model, tokenizer, label: str, mode: str, llama_python: str,
            new_tokens: int, given: Path | None = None) -> dict:
    """One row: ``model`` written with ``save_gguf(mode=mode)`` (or the file ``given``), run
    by llama.cpp, vs eager."""
    import numpy as np
    import torch

    from babai_ao.calibration.models import smollm2_gguf
    from babai_ao.checkpoints.gguf import save_gguf

    ids = tokenizer(PROMPT).input_ids
    with torch.no_grad():
        ours = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens,
                              do_sample=False)[0, len(ids):].tolist()
        logits = model(input_ids=torch.tensor([ids + ours])).logits[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = given if given is not None else save_gguf(
            model, Path(tmp) / "smollm2.gguf", mode=mode, source=smollm2_gguf())
        size_mb = path.stat().st_size / 2**20
        t0 = time.perf_counter()
        run = subprocess.run([llama_python, __file__, "--llama-side", str(path),
                              json.dumps(ids), json.dumps(ours), str(new_tokens),
                              str(Path(tmp) / "logits.npy")],
                             capture_output=True, text=True, check=True)
        seconds = time.perf_counter() - t0
        theirs_logits = torch.from_numpy(np.load(Path(tmp) / "logits.npy"))
    theirs = json.loads(run.stdout.strip().splitlines()[-1])
    diff = (theirs_logits - logits).abs().amax(dim=-1)
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs["tokens"])) if a != b),
                len(ours))
    forced_argmax = int((theirs_logits.argmax(-1) == logits.argmax(-1)).sum())
    return {
        "row": label, "file": mode, "file_mb": round(size_mb, 1),
        "tokenizer_ids_match": theirs["tokenized"] == ids,
        "greedy_tokens_match": f"{same}/{len(ours)}",
        "max_abs_logit_diff_last_prompt_pos": float(diff[len(ids) - 1]),
        "max_abs_logit_diff_all_positions": float(diff.max()),
        "argmax_equal_teacher_forced": f"{forced_argmax}/{len(diff)}",
        "ours": tokenizer.decode(ours), "llama_cpp": tokenizer.decode(theirs["tokens"]),
        "llama_cpp_seconds": round(seconds, 1)}


def given_files(args: argparse.Namespace) -> int:
    """``--gguf``: each file vs the eager model transformers reads from it."""
    import torch
    from transformers import AutoModelForCausalLM

    from babai_ao import load_smollm2

    _, tokenizer = load_smollm2(num_layers=1)
    rows = []
    for name in args.gguf:
        path = Path(name).resolve()
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     dtype=torch.float32).eval()
        rows.append(compare(model, tokenizer, f"{path.name} vs its weights in transformers",
                            "given", args.llama_python, args.new_tokens, given=path))
        if args.float_check:
            rows.append(compare(model, tokenizer, f"{path.name}'s weights as F32", "f32",
                                args.llama_python, args.new_tokens))
    result = {"prompt": PROMPT, "rows": rows}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama-python", default=".venv-llama/bin/python")
    p.add_argument("--asymmetric", action="store_true", help="Q4_1 instead of Q4_0")
    p.add_argument("--float-check", action="store_true",
                   help="also the quantized model as F32 (mode='f32') and the float model")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--num-layers", type=int, help="first N blocks only (default: all 30)")
    p.add_argument("--gguf", action="append", help="run this GGUF file (repeatable)")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--llama-side", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.llama_side:
        path, ids, forced, n, out = args.llama_side
        print(json.dumps(llama_side(path, json.loads(ids), json.loads(forced), int(n), out)))
        return 0

    from torchao.quantization import quantize_

    from babai_ao import babai_config, load_smollm2

    if args.gguf:
        return given_files(args)
    model, tokenizer = load_smollm2(num_layers=args.num_layers)
    float_model = copy.deepcopy(model) if args.float_check else None
    sym = not args.asymmetric
    quantize_(model, babai_config(bits=4, group_size=32, symmetric=sym, exact_offset=not sym))
    fmt = "q4_0" if sym else "q4_1"
    rows = [compare(model, tokenizer, f"RTN 4-bit g32 as {fmt.upper()}", fmt,
                    args.llama_python, args.new_tokens)]
    if float_model is not None:
        rows.append(compare(model, tokenizer, "same RTN weights, dequantized, as F32", "f32",
                            args.llama_python, args.new_tokens))
        rows.append(compare(float_model, tokenizer, "float SmolLM2 (fp32 copy) as F32",
                            "f32", args.llama_python, args.new_tokens))
    result = {"num_layers": args.num_layers or 30, "prompt": PROMPT, "rows": rows}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
