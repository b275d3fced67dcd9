"""P1 perplexity of GGUF files: llama.cpp's own Q4_K quantization of SmolLM2, or any GGUF.

A GGUF's weights are read back by transformers (gguf-py dequantizes every block to float32)
and evaluated exactly as ``benchmarks/p1.py`` evaluates a model (40 windows × 2048 tokens of
wiki.test.raw). Stored bits per weight count the bytes of the block linears' tensors in the
file (``blk.*`` 2-D weights: codes, scales, mins) over their weights, as P1 counts ours.

``--llama-ftype``: the float SmolLM2 (our fp32 copy) written as an all-F32 GGUF by
``save_gguf(mode="f32")``, then quantized by llama.cpp itself (``llama_model_quantize``
through llama-cpp-python, in its own venv ``--llama-python``):

* ``q4_k_pure``: ``pure=True`` — every block linear Q4_K where its rows allow; llama.cpp's
  fallback for rows not divisible by 256 is Q5_0 (``tensor_type_fallback`` in
  src/llama-quant.cpp), which is every SmolLM2 linear but ``ffn_down`` (576-wide rows);
* ``q4_k_s`` / ``q4_k_m``: llama.cpp's own mixtures (Q5_K/Q6_K on some ``attn_v`` and
  ``ffn_down``), at their own bits per weight.

The token embedding stays F32 in every file (``token_embedding_type``; P1 quantizes only the
block linears). ``--imatrix`` gives llama.cpp an importance matrix computed from P1's own
calibration windows (128 × 512 tokens of wiki.valid): per linear, the mean of ``x_k²`` over
the calibration tokens of its input — what ``llama-imatrix`` accumulates, here from
``layer_hessians``' diagonals (the float model, like ``llama-imatrix``).

``--babai``: ours at the same types — sequential calibration (P1's 128 × 512 windows, act
order) onto Q4_K where the rows allow and Q5_0 elsewhere (``quantize_q4_k_model``), written by
``save_gguf(mode="q4_k")`` and evaluated from the file like llama.cpp's. ``--gguf FILE``
evaluates a given file.

    .venv/bin/python benchmarks/gguf_q4k_p1.py --llama-ftype q4_k_pure --imatrix \\
        --out benchmarks/results/p1_llamacpp_q4k_pure_imatrix.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FTYPES = {"q4_k_pure": (15, True), "q4_k_s": (14, False), "q4_k_m": (15, False)}
# (llama_ftype, pure): with pure=True any K-quant ftype means "Q4_K everywhere"


def llama_quantize(src: str, dst: str, ftype: int, pure: bool, imatrix: str | None) -> None:
    """Run in the llama-cpp-python venv: ``llama_model_quantize(src → dst)``."""
    import ctypes

    import llama_cpp
    import numpy as np

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.pure = pure
    params.nthread = 2
    params.token_embedding_type = llama_cpp.GGML_TYPE_F32
    keep = []
    if imatrix:
        data = dict(np.load(imatrix))
        entries = (llama_cpp.llama_model_imatrix_data * (len(data) + 1))()
        for i, (name, values) in enumerate(data.items()):
            arr = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(arr)
            entries[i].name = name.encode()
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        entries[len(data)].name = None
        params.imatrix = entries
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc})")


def imatrix_of(model: Any, calibration: Any) -> dict[str, Any]:
    """llama.cpp tensor name → mean ``x_k²`` over the calibration tokens of its input."""
    import gguf

    from babai_ao.calibration.sequential import layer_hessians

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(model.config.num_hidden_layers))
    out = {}
    for hf_name, acc in layer_hessians(model, calibration).items():
        name = names.get_name(f"{hf_name}.weight", try_suffixes=(".weight",))
        out[name] = (acc.hessian.diagonal() / acc.tokens).float().numpy()
    return out


def block_linear_bits(path: Path) -> tuple[float, dict[str, int]]:
    """Stored bits per weight of the ``blk.*`` 2-D tensors, and how many of each type."""
    import gguf

    reader = gguf.GGUFReader(path)
    nbytes = weights = 0
    kinds: dict[str, int] = {}
    for t in reader.tensors:
        if not t.name.startswith("blk.") or len(t.shape) != 2:
            continue
        nbytes += int(t.n_bytes)
        weights += int(t.n_elements)
        kind = t.tensor_type.name
        kinds[kind] = kinds.get(kind, 0) + 1
    return 8 * nbytes / weights, kinds


def load_gguf(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                dtype="float32").eval()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--llama-ftype", choices=tuple(FTYPES))
    what.add_argument("--gguf", help="evaluate this GGUF file")
    what.add_argument("--babai", action="store_true", help="Babai Q4_K/Q5_0, sequential")
    p.add_argument("--imatrix", action="store_true", help="llama.cpp with an importance matrix")
    p.add_argument("--grid-fit", choices=("minmax", "weighted", "best"), default="best",
                   help="--babai: grids from each block's range, diag(H)-weighted, "
                        "or the better of the two per layer")
    p.add_argument("--llama-python", default=".venv-llama/bin/python")
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--calib-n", type=int, default=128,
                   help="calibration windows of 512 tokens (Babai and the imatrix; P1: 128)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keep", help="keep llama.cpp's quantized file here")
    p.add_argument("--out", required=True)
    p.add_argument("--llama-side", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.llama_side:
        src, dst, ftype, pure, imatrix = args.llama_side
        llama_quantize(src, dst, int(ftype), pure == "1", imatrix or None)
        return 0

    import torch

    from babai_ao.calibration.data import calibration_windows, test_tokens
    from babai_ao.calibration.evaluate import window_losses
    from babai_ao.calibration.models import load_smollm2
    from babai_ao.checkpoints.gguf import save_gguf

    torch.set_num_threads(args.threads)
    record: dict[str, Any] = {
        "protocol": "P1" if (args.windows, args.seq_len, args.calib_n) == (40, 2048, 128)
        else f"P1 data, reduced: first {args.windows} test windows of {args.seq_len}, "
             f"{args.calib_n} calibration windows",
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(), "load_average_start": os.getloadavg(),
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "calibration": {"n": args.calib_n, "seq_len": 512, "seed": 0}
        if args.babai or args.imatrix else None}
    _, tokenizer = load_smollm2()
    with tempfile.TemporaryDirectory() as tmp:
        if args.gguf:
            path = Path(args.gguf)
            record["method"] = f"GGUF file {path.name}"
        elif args.babai:
            from babai_ao.checkpoints.gguf_model import quantize_q4_k_model

            model, _ = load_smollm2()
            cal = calibration_windows(tokenizer, n=args.calib_n, seq_len=512)
            t0 = time.perf_counter()
            blocks, report = quantize_q4_k_model(model, cal, grid_fit=args.grid_fit)
            record.update(method="babai Q4_K (Q5_0 fallback), sequential, act order",
                          grid_fit=args.grid_fit,
                          quant_seconds=time.perf_counter() - t0,
                          layers=[{"name": r.name, "type": blocks[f"{r.name}.weight"].ggml_type,
                                   "error": r.error, "bound": r.bound, "clipped": r.clipped,
                                   "E_le_B": r.clipped == 0 and r.error <= r.bound * (1 + 1e-6)}
                                  for r in report.rows])
            path = Path(args.keep) if args.keep else Path(tmp) / "babai.gguf"
            save_gguf(model, path, mode="q4_k", blocks=blocks)
            del model
        else:
            model, _ = load_smollm2()
            f32 = save_gguf(model, Path(tmp) / "f32.gguf", mode="f32")
            imatrix = ""
            if args.imatrix:
                import numpy as np

                cal = calibration_windows(tokenizer, n=args.calib_n, seq_len=512)
                t0 = time.perf_counter()
                imatrix = str(Path(tmp) / "imatrix.npz")
                np.savez(imatrix, **imatrix_of(model, cal))
                record["imatrix_seconds"] = time.perf_counter() - t0
            del model
            ftype, pure = FTYPES[args.llama_ftype]
            path = Path(args.keep) if args.keep else Path(tmp) / "llama.gguf"
            t0 = time.perf_counter()
            run = subprocess.run([args.llama_python, __file__, "--out", "-", "--gguf", "-",
                                  "--llama-side", str(f32), str(path), str(ftype),
                                  "1" if pure else "0", imatrix],
                                 capture_output=True, text=True)
            if run.returncode != 0:
                raise SystemExit(f"llama.cpp quantize failed:\n{run.stderr[-3000:]}")
            fallbacks = [ln.strip() for ln in run.stderr.splitlines() if "falling back" in ln]
            record.update(method=f"llama.cpp {args.llama_ftype}"
                          + (" + imatrix (P1 calibration)" if args.imatrix else ""),
                          llama_ftype=args.llama_ftype, imatrix=args.imatrix,
                          quant_seconds=time.perf_counter() - t0,
                          fallback_lines=len(fallbacks), fallback_example=fallbacks[:1])
        bits, kinds = block_linear_bits(path)
        record.update(avg_bits_per_weight=bits, block_linear_types=kinds,
                      file_mb=round(path.stat().st_size / 2**20, 1))
        model = load_gguf(path)
    ids = test_tokens(tokenizer)
    t0 = time.perf_counter()
    losses = window_losses(model, ids, args.windows, args.seq_len, True)
    record.update(eval_seconds=time.perf_counter() - t0, windows=args.windows,
                  seq_len=args.seq_len, window_losses=losses,
                  ppl=float(torch.tensor(losses, dtype=torch.float64).mean().exp()),
                  load_average_end=os.getloadavg())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"{record['method']}: {bits:.3f} bits/weight {kinds}, PPL(P1) = {record['ppl']:.3f}"
          f" -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
