"""The peer's P1 calibrate + quantize time, run back to back with ours (issue 23 item 4).

Two steps, because llm-compressor pins its own transformers and lives in a venv of its own
(``../shared/PEERS.md``: ``python3 -m venv peer-venv && peer-venv/bin/pip install
torch==2.13.0 llmcompressor==0.14.0.1``):

    .venv/bin/python benchmarks/peer_p1.py prepare --dir /tmp/peer-p1
        # SmolLM2 fp32 (model + tokenizer) and P1's 128 × 512 calibration windows
    peer-venv/bin/python benchmarks/peer_p1.py run --dir /tmp/peer-p1 --threads 2 \\
        --out benchmarks/results/peer_llmcompressor_w4g64_act.json
        # GPTQModifier w4g64 asymmetric, static act-order, damping 0.01, block 128:
        # wall seconds of ``oneshot`` (calibrate + quantize), peak RSS

The windows are the exact token ids ``benchmarks/p1.py`` calibrates on (``torch.save``d), so
the peer sees the same data; only the ``run`` step is timed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import sys
import time
from pathlib import Path


def prepare(out: Path) -> None:
    import torch

    from babai_ao.calibration.data import calibration_windows
    from babai_ao.calibration.models import load_smollm2

    model, tokenizer = load_smollm2()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    windows = calibration_windows(tokenizer, n=128, seq_len=512)
    torch.save(torch.as_tensor(windows), out / "windows.pt")
    print(f"wrote {out}/model and {out}/windows.pt {tuple(torch.as_tensor(windows).shape)}")


def run(src: Path, threads: int, actorder: str | None, bits: int, out: Path) -> None:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    ids = torch.load(src / "windows.pt")
    data = Dataset.from_dict({"input_ids": ids.tolist(),
                              "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(src / "model", torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src / "model")
    recipe = GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": bits, "type": "int", "symmetric": False, "strategy": "group",
            "group_size": 64, "actorder": actorder}}},
        ignore=["lm_head"], dampening_frac=0.01, block_size=128)
    load = os.getloadavg()
    t0 = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=data, recipe=recipe,
            num_calibration_samples=len(ids), max_seq_length=ids.shape[1],
            shuffle_calibration_samples=False, batch_size=1)
    wall = time.perf_counter() - t0
    record = {"peer": "llm-compressor GPTQModifier", "bits": bits, "group_size": 64,
              "actorder": actorder, "threads": threads, "oneshot_seconds": wall,
              "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              "load_average_start": load, "load_average_end": os.getloadavg(),
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "torch": torch.__version__, "command": " ".join(["python", *sys.argv])}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--dir", type=Path, required=True)
    b = sub.add_parser("run")
    b.add_argument("--dir", type=Path, required=True)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--bits", type=int, default=4)
    b.add_argument("--actorder", default="static", help="static, or none")
    b.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if args.cmd == "prepare":
        prepare(args.dir)
    else:
        run(args.dir, args.threads, None if args.actorder == "none" else args.actorder,
            args.bits, args.out)


if __name__ == "__main__":
    main()
