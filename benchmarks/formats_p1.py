"""P1 perplexity versus measured average bits: RTN, HRTN, clipped Babai g64, SSQR, HPTQ.

Hessians are observe-mode (one float-model forward over the P1 calibration windows with
hooks on every decoder linear; q/k/v and gate/up share theirs), cached under
``babai_ao.calibration.models.cache_dir()/hessians``. Every row quantizes all 210 decoder linears of
SmolLM2-135M with those Hessians, installs the dequantized weights (the exact values the
stored format decodes to; HPTQ's are decoded from its Huffman stream) and runs the P1
perplexity. Bits per weight = 8 · (every stored byte of the 210 quantized linears) /
(their weight count).

    .venv/bin/python benchmarks/formats_p1.py run hptq@3.297 babai3 ...   # appends results
    .venv/bin/python benchmarks/formats_p1.py report                        # table + plot

Row names: ``rtn{b}``, ``babai{b}`` (clipped, g64, packed b-bit zeros), ``hrtn@{bits}``,
``hptq@{bits}`` (one scale per tensor), ``ssqr{b}@{bits}`` (g64).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import platform
import re
import sys
import time
from pathlib import Path

import torch
from torch import nn

from babai_ao.calibration.data import calibration_windows
from babai_ao.calibration.evaluate import perplexity
from babai_ao.calibration.models import cache_dir, load_smollm2
from babai_ao.calibration.sequential import decoder_blocks
from babai_ao.formats import hptq, ssqr
from babai_ao.formats.packing import pack
from babai_ao.lattice.hessian import HessianAccumulator
from babai_ao.lattice.quantize import quantize_weight

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "formats_p1.jsonl"
P1_RUNS = HERE / "results" / "p1"  # benchmarks/p1.py records (sequential calibration)
PLOT = HERE / "formats_p1.png"
GROUP = 64
BEGIN, END = "<!-- formats_p1:begin -->", "<!-- formats_p1:end -->"
BENCHMARKS = HERE.parent / "BENCHMARKS.md"
# Peer rows of ../shared/PEERS.md (P1), at their bits with a packed integer zero.
PEERS = [("RTN w4g64 (peer)", 4.3125, 27.224), ("GPTQ llm-compressor w4g64", 4.3125, 25.380),
         ("GPTQ llm-compressor w4g64 static act", 4.3125, 23.940),
         ("RTN w3g64 (peer)", 3.297, 72.760), ("GPTQ llm-compressor w3g64", 3.297, 52.935)]
FLOAT_PPL = 20.574


class _Stop(Exception):
    pass


def observe_hessians(model: nn.Module, calibration: torch.Tensor, batch_size: int = 8
                     ) -> dict[str, torch.Tensor]:
    """``H = XᵀX`` of every decoder linear's input from float forwards (observe mode).

    Linears fed the very same tensor share one accumulator (and one dict entry object).
    """
    path, blocks = decoder_blocks(model)
    linears = {f"{path}.{i}.{n}": m for i, b in enumerate(blocks)
               for n, m in b.named_modules() if isinstance(m, nn.Linear)}
    accs: dict[str, HessianAccumulator] = {}
    owner: dict[str, str] = {}  # linear -> name of the accumulator it shares
    last: list = [None, ""]  # the previous linear's input tensor (kept alive) and owner

    def hook_for(name: str):
        def hook(_m: nn.Module, args: tuple) -> None:
            x = args[0]
            if name not in owner:  # linears reading the previous linear's tensor share H
                owner[name] = last[1] if x is last[0] else name
                if owner[name] == name:
                    accs[name] = HessianAccumulator(x.shape[-1])
            last[0], last[1] = x, owner[name]
            if owner[name] == name:
                accs[name].add(x.detach())
        return hook

    def stop(_m: nn.Module, _a: tuple) -> None:
        raise _Stop

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in linears.items()]
    handles.append(model.model.norm.register_forward_pre_hook(stop))  # skip lm_head
    try:
        with torch.no_grad():
            for batch in calibration.split(batch_size):
                last[0] = None
                with contextlib.suppress(_Stop):
                    model(input_ids=batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: accs[owner[n]].hessian for n in linears}


def cached_hessians(model: nn.Module, calibration: torch.Tensor) -> dict[str, torch.Tensor]:
    key = hashlib.sha256(calibration.numpy().tobytes()).hexdigest()[:16]
    path = cache_dir() / "hessians" / f"smollm2-observe-v2-{key}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    t0 = time.perf_counter()
    hs = observe_hessians(model, calibration)
    linears = dict(model.named_modules())
    for name, h in hs.items():  # never cache a Hessian of the wrong layer
        assert h.shape == (linears[name].in_features,) * 2, name
    print(f"observe-mode Hessians: {time.perf_counter() - t0:.0f} s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(hs, tmp)
    tmp.replace(path)
    return hs


def clipped_nbytes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int
                   ) -> int:
    """Bytes of the clipped format: packed codes, scales, zeros packed flat at ``bits``."""
    packed = pack(codes, bits)
    zp = pack(zeros.reshape(1, -1), bits)
    return packed.numel() + scales.numel() * scales.element_size() + zp.numel()


def quantize_layer(row: str, w: torch.Tensor, h: torch.Tensor
                   ) -> tuple[torch.Tensor, int, bool | None]:
    """``(dequantized weight, stored bytes, E ≤ B or None when clipped)`` for one row kind."""
    m = re.fullmatch(r"(rtn|babai|hrtn|hptq|ssqr)(\d)?(?:@([\d.]+))?", row)
    if m is None:
        raise SystemExit(f"bad row name {row!r}")
    kind, b, target = m.group(1), m.group(2), m.group(3)
    if kind in ("rtn", "babai"):
        qw = quantize_weight(w, None if kind == "rtn" else h, bits=int(b), group_size=GROUP,
                             clip=True)
        # a clipped grid has no bound, even on a layer where nothing happened to clip
        return qw.dequantize(), clipped_nbytes(qw.codes, qw.scales, qw.zeros, int(b)), None
    if kind in ("hrtn", "hptq"):
        hw = hptq.quantize(w, None if kind == "hrtn" else h, float(target))
        return hw.dequantize(), hw.nbytes, hw.certificate.bound_holds
    sw = ssqr.quantize(w, h, int(b), GROUP, target_bits=float(target))
    return sw.dequantize(), sw.nbytes, sw.certificate.bound_holds


def run_row(row: str, model: nn.Module, tokenizer, hessians: dict[str, torch.Tensor],
            original: dict[str, torch.Tensor]) -> dict:
    modules = dict(model.named_modules())
    t0 = time.perf_counter()
    nbytes = numel = 0
    holds = [0, 0]
    for name, w in original.items():
        deq, nb, ok = quantize_layer(row, w, hessians[name])
        modules[name].weight.data = deq.to(w.dtype)
        nbytes += nb
        numel += w.numel()
        if ok is not None:
            holds[0] += bool(ok)
            holds[1] += 1
    quant_s = time.perf_counter() - t0
    print(f"{row}: quantized in {quant_s:.0f} s, {8 * nbytes / numel:.4f} bits", flush=True)
    t1 = time.perf_counter()
    ppl = perplexity(model, tokenizer, progress=False)
    return {"row": row, "bits": 8 * nbytes / numel, "bytes": nbytes, "weights": numel,
            "ppl": ppl, "bound_holds": f"{holds[0]}/{holds[1]}" if holds[1] else "n/a (clipped)",
            "quantize_s": round(quant_s, 1), "eval_s": round(time.perf_counter() - t1, 1),
            "hessians": "observe-mode", "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, shared CPU"}


def run(rows: list[str]) -> None:
    torch.set_num_threads(2)
    model, tokenizer = load_smollm2()
    path, blocks = decoder_blocks(model)
    original = {f"{path}.{i}.{n}": m.weight.detach().clone() for i, b in enumerate(blocks)
                for n, m in b.named_modules() if isinstance(m, nn.Linear)}
    hessians = cached_hessians(model, calibration_windows(tokenizer))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    for row in rows:
        result = run_row(row, model, tokenizer, hessians, original)
        print(json.dumps(result), flush=True)
        with RESULTS.open("a") as f:
            f.write(json.dumps(result) + "\n")


LABELS = {"rtn": "RTN g64 (clipped)",
          "babai": "Babai/GPTQ g64 (clipped, natural order, observe-mode H)",
          "p1": "Babai/GPTQ g64 (clipped, sequential calibration; P1 table)", "hrtn": "HRTN",
          "hptq": "HPTQ (per tensor)", "ssqr": "SSQR g64",
          "hptqseq": "HPTQ (per tensor, sequential calibration; P1 table)",
          "ssqrseq": "SSQR g64 (sequential calibration; P1 table)",
          "hptqlam": "HPTQ sequential, one-λ bit allocation (issue 21)",
          "hptqkbest": "HPTQ sequential, K-best search (issue 21)",
          "hptqlamkbest": "HPTQ sequential, one-λ allocation + K-best (issue 21)",
          "hptqminpivot": "HPTQ sequential, min-pivot order (issue 21)",
          "hptqtune": "HPTQ sequential, block tuning (issue 21)",
          "hptqlamtune": "HPTQ sequential, one-λ allocation + block tuning (issue 21)",
          "hptqlamkbesttune": "HPTQ sequential, one-λ + K-best + block tuning (issue 21)"}


def _kind(row: str | dict) -> str:
    if isinstance(row, dict):
        return row.get("kind") or _kind(row["row"])
    return re.match(r"[a-z]+", row).group(0)


def sequential_rows() -> list[dict]:
    """Rows of the P1 table (``benchmarks/p1.py``, sequential calibration) in this report's
    shape: clipped grids, and the no-clipping formats calibrated sequentially."""
    rows = []
    for path in sorted(P1_RUNS.glob("*.json")):
        r = json.loads(path.read_text())
        if r.get("method") not in ("rtn", "babai") or r.get("mode", "sequential") != "sequential":
            continue
        fmt = r.get("format", "grid")
        if fmt in ("hptq", "ssqr"):  # no clipping: the certificate's E <= B count
            checks = r["bound_checks"]
            holds, kind = f"{checks['E_le_B']}/{checks['layers']}", f"{fmt}seq"
            levers = ("minpivot" if r.get("order") == "min-pivot" else "") + (
                "lam" if r.get("allocate") else "") + (
                "kbest" if r.get("search") == "kbest" else "") + (
                "tune" if (r.get("tune") or {}).get("steps") else "")
            kind = f"{fmt}{levers}" if levers else kind
        else:
            holds, kind = "n/a (clipped)", "p1" if r["method"] == "babai" else "rtn"
        rows.append({"row": f"{path.stem}", "bits": r["avg_bits_per_weight"], "ppl": r["ppl"],
                     "bound_holds": holds, "quantize_s": r["quant_seconds"],
                     "date": r["date"][:10], "kind": kind})
    return rows


def report() -> str:
    results = {}
    for line in RESULTS.read_text().splitlines():
        r = json.loads(line)
        if _kind(r) in ("rtn", "babai"):
            r["bound_holds"] = "n/a (clipped)"  # rows logged before clipped rows skipped it
        results[r["row"]] = r  # the latest run of a row wins
    results.update({r["row"]: r for r in sequential_rows()})
    rows = sorted(results.values(), key=lambda r: (round(r["bits"]), r["bits"], r["ppl"]))
    lines = [BEGIN,
             "Observe-mode Hessians unless the row says sequential calibration (see above). "
             "`E ≤ B layers`: no-clipping rows whose certificate holds (clipped rows have no "
             "bound).", "",
             "| row | bits/weight (measured) | WikiText-2 PPL (P1) | E ≤ B layers | "
             "quantize s | date |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {LABELS[_kind(r)]} `{r['row']}` | {r['bits']:.3f} | "
                     f"{r['ppl']:.3f} | {r['bound_holds']} | {r['quantize_s']:.0f} | "
                     f"{r['date']} |")
    done = {r["row"] for r in rows}
    lines += ["", f"Float32: {FLOAT_PPL} (P1). Peers (../shared/PEERS.md) are on the plot "
              "at their packed-zero bits: ![bits vs PPL](benchmarks/formats_p1.png)",
              f"Rows finished: {len(done)}. Quantize times are wall seconds on the shared box.",
              END]
    _plot(rows)
    return "\n".join(lines)


def _plot(rows: list[dict]) -> None:
    """Two panels: every row on a log scale, and the no-clipping frontier (sequential HPTQ
    levers and the peers) on a linear scale around the float model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab20").colors
    fig, (full, zoom) = plt.subplots(1, 2, figsize=(13, 5))
    for i, (kind, label) in enumerate(LABELS.items()):
        pts = sorted((r["bits"], r["ppl"]) for r in rows if _kind(r) == kind)
        if not pts:
            continue
        for ax in (full, zoom) if kind.startswith("hptq") else (full,):
            ax.plot(*zip(*pts), marker="o", color=colors[i % 20], label=label)
    for i, (label, bits, ppl) in enumerate(PEERS):
        for ax in (full, zoom):
            ax.scatter([bits], [ppl], marker="x", s=50, color=colors[(2 * i + 1) % 20],
                       label=f"{label} (peer)")
    for ax in (full, zoom):
        ax.axhline(FLOAT_PPL, color="gray", ls="--", lw=0.8, label="float32")
        ax.set_xlabel("average bits per weight (all stored bytes)")
        ax.set_ylabel("WikiText-2 perplexity (P1)")
    full.set_yscale("log")
    full.set_title("SmolLM2-135M: no-clipping formats vs clipped grids")
    full.legend(fontsize=6)
    zoom.set_ylim(FLOAT_PPL - 1, 90)
    zoom.set_title("the frontier: sequential HPTQ levers (issue 21) and the peers")
    handles, labels = zoom.get_legend_handles_labels()
    keep = [(h, lab) for h, lab in zip(handles, labels) if "HPTQ" in lab or "peer" in lab
            or lab == "float32"]
    zoom.legend(*zip(*keep), fontsize=6)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=120)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("rows", nargs="+")
    rep = sub.add_parser("report")
    rep.add_argument("--write", action="store_true",
                     help="replace the formats_p1 block of BENCHMARKS.md with the table")
    args = p.parse_args(argv)
    if args.cmd == "run":
        run(args.rows)
        return
    text = report()
    print(text)
    if args.write:
        doc = BENCHMARKS.read_text()
        i, j = doc.index(BEGIN), doc.index(END) + len(END)
        BENCHMARKS.write_text(doc[:i] + text + doc[j:])


if __name__ == "__main__":
    main(sys.argv[1:])
