"""Run records: what a quantization run wrote (``babai_run.json``) and how to read it back.

A record is a JSON object with the keys of ``benchmarks/p1.py``'s records, so both kinds
feed the same report: ``method`` (``float``/``rtn``/``babai``), the grid (``bits``,
``group_size``, ``order``, ``clip``, ``mode``), ``layers`` (one row per quantized linear:
``name, trace_d, error, error_undamped, bound, clipped, bits_per_weight`` and, from
sequential calibration, ``seconds, tokens``), ``avg_bits_per_weight`` (stored bytes of the
quantized weights · 8 / their number of weights), the depth (``num_layers`` blocks kept of
the model's ``model_layers``, ``cut``: see ``babai_ao.cli.depth``) and, once evaluated,
``ppl``, ``windows``, ``seq_len``, ``ppl_num_layers`` (blocks the perplexity ran on).
``quantized_parameters`` and ``float_parameters`` (elements per kind) say what stayed float.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from babai_ao.calibration.blocks import decoder_blocks
from babai_ao.calibration.coverage import float_parameters
from babai_ao.calibration.layers import is_quantizable
from babai_ao.calibration.report import LayerReport, QuantizationReport
from babai_ao.errors import BabaiError

RUN_FILE = "babai_run.json"


def decoder_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every ``nn.Linear`` and ``Conv1D`` in the blocks."""
    path, blocks = decoder_blocks(model)
    return [(f"{path}.{i}.{n}", m) for i, b in enumerate(blocks)
            for n, m in b.named_modules() if is_quantizable(m)]


def coverage_fields(model: nn.Module, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Record keys saying what stayed float: ``quantized_parameters`` (elements of the
    quantized weights: the ``rows``) and ``float_parameters`` (elements per kind:
    ``embedding``, ``norm`` …; ``babai_ao.calibration.coverage``)."""
    path, _ = decoder_blocks(model)
    floats, quantized = float_parameters(model, [f"{r['name']}.weight" for r in rows], path)
    by_kind: dict[str, int] = {}
    for p in floats:
        by_kind[p.kind] = by_kind.get(p.kind, 0) + p.numel
    return {"quantized_parameters": quantized, "float_parameters": by_kind}


def certificate_rows(model: nn.Module) -> list[dict[str, Any]]:
    """Per-layer rows read from the certificates that quantized weights carry."""
    rows = []
    for name, lin in decoder_linears(model):
        cert = getattr(lin.weight, "certificate", None)
        if cert is None:
            continue
        rows.append({"name": name, "trace_d": cert.trace_d, "error": cert.error,
                     "error_undamped": cert.error_undamped, "bound": cert.bound,
                     "clipped": cert.clipped, "bits_per_weight": cert.bits_per_weight,
                     "bound_holds": cert.bound_holds})
    return rows


def report_rows(report: QuantizationReport) -> list[dict[str, Any]]:
    """Rows of a ``quantize_model`` report as JSON-able dicts."""
    return [{**asdict(r), "bound_holds": r.bound_holds} for r in report.rows]


def stored_bits_per_weight(model: nn.Module) -> float | None:
    """Average stored bits per weight of the quantized block layers and MoE experts
    (``None``: none are quantized).

    Counts the bytes of every stored tensor of a weight (codes, scales, zeros, outliers).
    """
    bits, count = 0.0, 0
    for _, lin in decoder_linears(model):
        w = lin.weight.detach()
        numel = w.shape[0] * w.shape[1]
        stored = getattr(w, "nbytes_stored", None)
        cert = getattr(w, "certificate", None)
        if stored is not None:
            bits += 8 * int(stored)
        elif cert is not None:  # e.g. a Huffman-coded weight: its certificate counts bytes
            bits += cert.bits_per_weight * numel
        else:
            continue
        count += numel
    for module in model.modules():  # fused MoE experts: packed buffers, no weight parameter
        if callable(getattr(module, "quantized_numel", None)):
            bits += 8 * module.nbytes_stored
            count += module.quantized_numel()
    return bits / count if count else None


def write_json(path: str | os.PathLike[str], record: dict[str, Any]) -> Path:
    """Write ``record`` atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1, default=_jsonable))
    tmp.replace(path)
    return path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serializable")


def load_run(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A run record from a run directory (its ``babai_run.json``) or a ``.json`` file."""
    p = Path(path)
    file = p / RUN_FILE if p.is_dir() else p
    if not file.is_file():
        raise BabaiError(f"{path} holds no run record ({RUN_FILE}): pass a directory written "
                         "by `babai-ao quantize` or a JSON file from benchmarks/p1.py")
    try:
        record = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise BabaiError(f"{file} is not a readable JSON run record ({e}): quantize again "
                         "to rewrite it") from None
    if not isinstance(record, dict):
        raise BabaiError(f"{file} is not a run record (a JSON object): quantize again")
    record.setdefault("label", p.stem if p.is_file() else p.name)
    return record


def layer_table(record: dict[str, Any]) -> str:
    """Markdown table of a record's layers (``QuantizationReport.to_markdown``)."""
    names = [f.name for f in fields(LayerReport)]
    rows = [LayerReport(**{n: row.get(n, 0) for n in names}) for row in record.get("layers", [])]
    return QuantizationReport(mode=str(record.get("mode", "")), rows=rows).to_markdown()


def bound_summary(rows: list[dict[str, Any]]) -> str:
    """What the certificates say: ``E ≤ B`` counted on unclipped layers only (the bound is a
    guarantee there); for clipped layers, that it is not one, and their median ``E/B``."""
    unclipped = [r for r in rows if not r.get("clipped", 0)]
    clipped = [r for r in rows if r.get("clipped", 0)]
    parts = []
    if unclipped:
        held = sum(bool(r.get("bound_holds")) for r in unclipped)
        parts.append(f"E <= B on {held}/{len(unclipped)} unclipped layers")
    if clipped:
        ratios = [r["error"] / r["bound"] for r in clipped if r.get("bound")]
        median = f", median E/B {statistics.median(ratios):.3g}" if ratios else ""
        parts.append(f"clipped grid in {len(clipped)}/{len(rows)} layers "
                     f"({sum(r['clipped'] for r in clipped)} weights clipped): E <= B not "
                     f"guaranteed there{median}")
    return "; ".join(parts) or "no quantized layers"


def format_ppl(ppl: float) -> str:
    """A perplexity for people: ``12.346``, or ``1.639e+08`` once it has many digits."""
    return f"{ppl:.3f}" if abs(ppl) < 1e4 else f"{ppl:.3e}"
