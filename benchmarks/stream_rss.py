"""Peak resident memory of ``quantize_model`` in memory vs streamed (issue 19), on SmolLM2.

Each mode runs in a fresh subprocess: import everything, make the calibration windows, read
the process's RSS (``base``), then quantize and save the model; the peak is ``ru_maxrss``.
``net = peak − base``. ``memory``: ``load_smollm2`` + ``quantize_model`` +
``hf.save_pretrained``. ``stream``: ``empty_model`` + ``quantize_model(stream=BlockStream(
SafetensorsSource(fp32 copy), ShardWriter))`` + ``commit``. Both outputs are hashed tensor by
tensor, so the run also says whether the streamed checkpoint equals the in-memory one.

The bound of the issue: ``1.5 × (one block's fp32 weights + calibration activations +
embedding)``, the activations being one copy of the hidden states ``n·T·d·4`` bytes.

    python benchmarks/stream_rss.py                      # P1: 128×512, w4g64 act, sequential
    python benchmarks/stream_rss.py --num-layers 4       # a cut model (faster)
    python benchmarks/stream_rss.py --modes stream --stream-lockstep   # BlockStream(lean=False)

``stream`` is a lean stream by default (``BlockStream(lean=True)``: rerun path, no replay
recordings, activations spilled to a temporary directory, glibc's mmap threshold fixed);
``--no-spill`` keeps the activations in memory, ``--allocator {mmap,trim,off}`` picks the
malloc settings (``BlockStream(allocator=...)``);
``--stream-lockstep`` streams with the in-memory defaults (lockstep forwards, no spill).
``--threads N`` sets torch's intra-op threads in the child.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 1 << 20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmHWM``: peak RSS so far; ``VmRSS``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _digest(directory: Path) -> str:
    from safetensors import safe_open

    tensors: dict[str, bytes] = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            for k in h.keys():  # noqa: SIM118
                tensors[k] = h.get_tensor(k).contiguous().view(-1).view(
                    __import__("torch").uint8).numpy().tobytes()
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k])
    return h.hexdigest()


def child(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoConfig, AutoTokenizer

    import babai_ao
    from babai_ao.calibration.data import calibration_windows
    from babai_ao.calibration.models import fp32_copy_dir, load_smollm2
    from babai_ao.calibration.sequential import quantize_model
    from babai_ao.calibration.streaming import BlockStream, SafetensorsSource, empty_model
    from babai_ao.checkpoints.hf import save_pretrained
    from babai_ao.checkpoints.streamed import ShardWriter

    tokenizer = AutoTokenizer.from_pretrained(fp32_copy_dir())
    calib = calibration_windows(tokenizer, n=args.calib_n, seq_len=args.calib_len, seed=0)
    config = babai_ao.babai_config(bits=4, group_size=64, order="act")
    out = Path(tempfile.mkdtemp(prefix="stream-rss-"))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.replay_budget is not None:  # bytes of replayed outputs kept per block
        from babai_ao.calibration import replay

        replay.REPLAY_BUDGET = args.replay_budget
    base = _rss()
    base_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    per_block: list[dict] = []
    if args.child == "memory":
        model, _ = load_smollm2(num_layers=args.num_layers)
        quantize_model(model, config, calib, progress=False)
        save_pretrained(model, out, config)
    else:
        hf = AutoConfig.from_pretrained(fp32_copy_dir())
        if args.num_layers is not None:
            hf.num_hidden_layers = args.num_layers
            if getattr(hf, "layer_types", None):
                hf.layer_types = hf.layer_types[:args.num_layers]
        model = empty_model(hf)
        source = SafetensorsSource(fp32_copy_dir())
        sink = ShardWriter(out, hf.num_hidden_layers)

        def trace(b: int, _model) -> None:  # before block b: the peak of blocks < b so far
            per_block.append({"block": b, "peak_so_far": _status_kb("VmHWM") * 1024,
                              "rss": _status_kb("VmRSS") * 1024,
                              "seconds": time.perf_counter() - t0})

        quantize_model(model, config, calib, progress=False,
                       stream=BlockStream(source, sink, lean=not args.stream_lockstep,
                                          on_block=trace, spill=not args.no_spill and None,
                                          allocator=args.allocator))
        sink.commit(model, source, out, config, "model.layers")
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    text = model.config.get_text_config()
    d, vocab = text.hidden_size, text.vocab_size
    block = sum(p.numel() for p in model.model.layers[0].parameters()) * 4
    return {"mode": args.child, "replay_budget": args.replay_budget,
            "stream_lean": None if args.child == "memory" else not args.stream_lockstep,
            "stream_spill": None if args.child == "memory" else not (
                args.no_spill or args.stream_lockstep),
            "stream_allocator": None if args.child == "memory" else args.allocator,
            "base_rss": base, "peak_before_run": base_peak, "peak": peak,
            "net_peak": peak - base, "seconds": seconds, "digest": _digest(out),
            "block_fp32_bytes": block, "embedding_bytes": vocab * d * 4,
            "activation_bytes": args.calib_n * args.calib_len * d * 4,
            "threads": torch.get_num_threads(), "per_block": per_block}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-layers", type=int, help="keep the first N blocks (default: all 30)")
    p.add_argument("--calib-n", type=int, default=128)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--modes", default="stream,memory")
    p.add_argument("--replay-budget", type=int,
                   help="bytes of recorded outputs replayed per block (default: replay's 2 GiB; "
                        "0 recomputes them, saving that memory)")
    p.add_argument("--stream-lockstep", action="store_true",
                   help="stream with lockstep forwards (BlockStream(lean=False)) instead of the "
                        "lean default")
    p.add_argument("--no-spill", action="store_true",
                   help="stream with the activations in memory (BlockStream(spill=False))")
    p.add_argument("--allocator", choices=("mmap", "trim", "off"), default="mmap",
                   help="BlockStream(allocator=...): fixed mmap threshold + trim per block "
                        "(mmap), trim per block only (trim), malloc as it is (off)")
    p.add_argument("--threads", type=int, help="torch threads in the child (default: torch's)")
    p.add_argument("--out", help="result JSON (default: benchmarks/results/stream_rss[-N].json)")
    p.add_argument("--child", choices=("memory", "stream"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    results = {}
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--child", mode, "--calib-n", str(args.calib_n),
               "--calib-len", str(args.calib_len)]
        if args.num_layers is not None:
            cmd += ["--num-layers", str(args.num_layers)]
        if args.replay_budget is not None:
            cmd += ["--replay-budget", str(args.replay_budget)]
        if args.threads is not None:
            cmd += ["--threads", str(args.threads)]
        for flag in ("stream_lockstep", "no_spill"):
            if getattr(args, flag):
                cmd += ["--" + flag.replace("_", "-")]
        cmd += ["--allocator", args.allocator]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"{mode} child failed ({run.returncode}):\n{run.stderr[-4000:]}")
        results[mode] = json.loads(run.stdout.strip().splitlines()[-1])
        r = results[mode]
        print(f"{mode}: peak {r['peak'] / MB:.0f} MB, base {r['base_rss'] / MB:.0f} MB, "
              f"net {r['net_peak'] / MB:.0f} MB, {r['seconds']:.0f} s", flush=True)
    any_r = next(iter(results.values()))
    bound = 1.5 * (any_r["block_fp32_bytes"] + any_r["activation_bytes"]
                   + any_r["embedding_bytes"])
    summary = {"num_layers": args.num_layers, "calib": [args.calib_n, args.calib_len],
               "threads": args.threads,
               "bound_bytes": bound, "results": results, "uptime": os.getloadavg(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if "stream" in results:
        summary["stream_net_within_bound"] = results["stream"]["net_peak"] <= bound
    if len({r["digest"] for r in results.values()}) == 1 and len(results) > 1:
        summary["outputs_identical"] = True
    elif len(results) > 1:
        summary["outputs_identical"] = False
    print(f"bound 1.5×(block {any_r['block_fp32_bytes'] / MB:.1f} + activations "
          f"{any_r['activation_bytes'] / MB:.1f} + embedding {any_r['embedding_bytes'] / MB:.1f}"
          f" MB) = {bound / MB:.0f} MB; identical outputs: {summary.get('outputs_identical')}")
    suffix = f"-{args.num_layers}" if args.num_layers is not None else ""
    path = Path(args.out or Path(__file__).parent / "results" / f"stream_rss{suffix}.json")
    path.write_text(json.dumps(summary, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
