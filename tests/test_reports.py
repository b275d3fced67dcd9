"""Reports say what they measured: a cut model (``--num-layers``) is named in every place its
numbers appear (CLI lines, ``babai_run.json``, ``report.md``, plots), plots read well (log
perplexity axes, layer names, no offset text), and the summary speaks of ``E ≤ B`` only where
the bound applies. Synthetic records, plus one end-to-end run on SmolLM2 (2 of 30 blocks)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from babai_ao import cli
from babai_ao.cli import plots
from babai_ao.cli.depth import Depth, ppl_depth
from babai_ao.cli.quantize import summary
from babai_ao.cli.report import write_report
from babai_ao.cli.runs import RUN_FILE, bound_summary, load_run, write_json

CUT = "first 2 of 30 blocks"
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def layer_rows(blocks: int = 2, clipped: int = 0) -> list[dict[str, Any]]:
    """Rows of ``blocks`` Llama blocks whose bounds span four decades."""
    rows = []
    for b in range(blocks):
        for k, kind in enumerate(KINDS):
            sub = "self_attn" if kind[0] in "qkvo" else "mlp"
            bound = 10.0 ** (k % 5) * (b + 1)
            rows.append({"name": f"model.layers.{b}.{sub}.{kind}", "trace_d": 1.0,
                         "error": bound / 2, "error_undamped": bound / 2, "bound": bound,
                         "clipped": clipped, "bits_per_weight": 4.3,
                         "bound_holds": clipped == 0})
    return rows


def record(label: str, *, ppl: float | None = 1.6e8, cut: bool = True, clipped: int = 0,
           bits: float = 4.3125, method: str = "babai") -> dict[str, Any]:
    rec = {"method": method, "model": "smollm2", "bits": 4, "group_size": 64,
           "order": "act", "clip": "true", "mode": "sequential", "layers": layer_rows(
               clipped=clipped), "avg_bits_per_weight": bits, "label": label,
           **Depth(2 if cut else 30, 30).fields()}
    if ppl is not None:
        rec["ppl"] = ppl
    return rec


# ---- depth: labels and records ---------------------------------------------------------
def test_depth_labels_and_old_records():
    assert Depth(2, 30).label == CUT and Depth(2, 30).cut
    assert Depth(30, 30).label == "" and not Depth(30, 30).cut
    assert Depth().label == "" and not Depth().cut  # nothing known: a whole-model run
    # records from before model_layers: the requested num_layers only, or nothing
    assert Depth.of_record({"num_layers": 2}).label == "first 2 blocks"
    assert not Depth.of_record({"num_layers": None}).cut
    assert not Depth.of_record({}).cut
    # eval --num-layers 1 on a saved run cut to 2 of 30
    assert Depth(1, 2).inside(Depth(2, 30)).label == "first 1 of 30 blocks"
    assert ppl_depth({"num_layers": 2, "model_layers": 30, "ppl_num_layers": 1}).kept == 1


def test_old_record_without_depth_keys_loads_and_reports(tmp_path):
    old = record("old", cut=False)
    for key in ("num_layers", "model_layers", "cut", "label"):
        old.pop(key)
    write_json(tmp_path / "old.json", old)
    rec = load_run(tmp_path / "old.json")
    (tmp_path / "r").mkdir()
    paths = write_report([rec, record("new", cut=False, bits=3.3, ppl=20.0)], tmp_path / "r")
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## old" in md and "cut model" not in md.lower()
    assert {p.name for p in paths} >= {"report.md", "bits_vs_ppl.png", "error_vs_bound_old.png"}


# ---- summary line: E ≤ B only where the bound applies ------------------------------------
def test_summary_unclipped_counts_e_le_b(capsys):
    summary({"method": "babai", "layers": layer_rows(), "avg_bits_per_weight": 4.3})
    out = capsys.readouterr().out
    assert "E <= B on 14/14 unclipped layers" in out
    assert "clipped grid" not in out and "cut model" not in out


def test_summary_clipped_says_bound_not_guaranteed(capsys):
    rows = layer_rows(clipped=3)
    rows[0]["clipped"] = 0
    rows[0]["bound_holds"] = True
    summary({"method": "rtn", "layers": rows, **Depth(2, 30).fields()})
    out = capsys.readouterr().out
    assert out.startswith(f"rtn (cut model: {CUT}):")
    assert "E <= B on 1/1 unclipped layers" in out
    assert "clipped grid in 13/14 layers (39 weights clipped): E <= B not guaranteed" in out
    assert "median E/B 0.5" in out


def test_all_clipped_has_no_zero_of_zero():
    text = bound_summary(layer_rows(clipped=1))
    assert "0/0" not in text and "unclipped" not in text
    assert text.startswith("clipped grid in 14/14 layers (14 weights clipped)")


# ---- report.md and plots -----------------------------------------------------------------
def test_report_md_names_the_cut(tmp_path):
    write_report([record("babai-w4g64"), record("rtn-w4g64", method="rtn", clipped=1)],
                 tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert f"## babai-w4g64 (cut model: {CUT})" in md
    assert md.count(f"only the {CUT} were kept") == 2
    assert "perplexity 1.600e+08" in md
    assert "clipped grid in 14/14 layers" in md and "| n/a |" in md


def test_report_md_whole_model_has_no_cut_words(tmp_path):
    write_report([record("full", cut=False, ppl=12.5)], tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "cut" not in md.lower() and "perplexity 12.500" in md


def _draw(fig: Any) -> Any:
    fig.canvas.draw()
    return fig.axes[0]


def test_error_vs_bound_plot_names_layers_log_scale_no_lines():
    fig = plots.error_vs_bound_figure(record("r", clipped=0))
    ax = _draw(fig)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[:2] == ["b0 q_proj", "b0 k_proj"] and labels[-1] == "b1 down_proj"
    assert ax.get_yscale() == "log"
    assert ax.get_lines() == []  # markers and bars: nothing joins unrelated layers
    assert CUT in ax.get_title()
    assert ax.yaxis.get_offset_text().get_text() == ""


def test_error_vs_bound_marks_clipped_layers():
    ax = _draw(plots.error_vs_bound_figure(record("r", clipped=2)))
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("clipped" in t and "not guaranteed" in t for t in legend)


def test_bits_vs_ppl_log_axis_readable_labels_and_float_line():
    recs = [record("babai-w4g64", ppl=1.6e8), record("rtn-w4g64", method="rtn", ppl=3.2e9,
                                                      bits=4.3)]
    ax = _draw(plots.bits_vs_perplexity_figure(recs, float_ppl=1.64e8))
    assert ax.get_yscale() == "log"
    assert ax.yaxis.get_offset_text().get_text() == ""
    texts = [t.get_text() for t in ax.texts]
    assert any(t.startswith("babai 4-bit g64 act\n(babai-w4g64)") for t in texts), texts
    assert any("ppl 3.200e+09" in t for t in texts)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["float32: ppl 1.640e+08"]
    assert CUT in ax.get_title()


def test_bits_vs_ppl_small_values_linear_without_offset():
    recs = [record("a", cut=False, ppl=12.31), record("b", cut=False, ppl=12.35, bits=3.3)]
    ax = _draw(plots.bits_vs_perplexity_figure(recs))
    assert ax.get_yscale() == "linear"
    assert ax.yaxis.get_offset_text().get_text() == ""
    assert "cut" not in ax.get_title()


def test_bits_vs_ppl_mixed_depths_label_each_point():
    recs = [record("cut-run"), record("full-run", cut=False, ppl=12.0, bits=3.3)]
    ax = _draw(plots.bits_vs_perplexity_figure(recs))
    texts = {t.get_text().split("\n")[1]: t.get_text() for t in ax.texts}
    assert f"cut model: {CUT}" in texts["(cut-run)"]
    assert "cut" not in texts["(full-run)"].replace("(full-run)", "")


# ---- end to end: SmolLM2 cut to 2 of its 30 blocks ------------------------------------------
@pytest.mark.model
def test_cut_run_labelled_in_cli_record_report_and_plots(capsys, tmp_path):
    run = tmp_path / "rtn-w4g64"
    assert cli.main(["quantize", "smollm2", "--num-layers", "2", "--mode", "rtn",
                     "--out", str(run), "--no-progress"]) == 0
    assert f"rtn (cut model: {CUT}):" in capsys.readouterr().out
    rec = json.loads((run / RUN_FILE).read_text())
    assert (rec["num_layers"], rec["model_layers"], rec["cut"]) == (2, 30, True)

    assert cli.main(["eval", str(run), "--windows", "1", "--seq-len", "64",
                     "--no-progress"]) == 0
    line = capsys.readouterr().out
    assert re.search(rf"perplexity [0-9.]+ \(.*cut model: {CUT}, not the full model[;)]", line)
    assert json.loads((run / RUN_FILE).read_text())["ppl_num_layers"] == 2

    assert cli.main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    assert f"(cut model: {CUT})" in (tmp_path / "rep" / "report.md").read_text()
    ax = _draw(plots.error_vs_bound_figure(load_run(run)))
    assert CUT in ax.get_title() and "b1 down_proj" in [t.get_text()
                                                        for t in ax.get_xticklabels()]


def test_rows_fixture_spans_decades():  # the log-scale assertions above depend on it
    bounds = [r["bound"] for r in layer_rows()]
    assert max(bounds) / min(bounds) >= 1e4


def test_error_vs_bound_whole_model_one_panel_per_linear_kind():
    rec = record("full", cut=False)
    rec["layers"] = layer_rows(blocks=30)
    fig = plots.error_vs_bound_figure(rec)
    fig.canvas.draw()
    assert [ax.get_ylabel() for ax in fig.axes] == list(KINDS)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()][:3] == ["b0", "b1", "b2"]
    assert ax.get_yscale() == "log" and ax.get_lines() == []
    assert "cut" not in ax.get_title()
