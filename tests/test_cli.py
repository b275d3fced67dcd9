"""The ``babai-ao`` command line: every subcommand end to end on SmolLM2 (2 blocks, few
windows), bad arguments (exit 2, one line naming the fix), atomic output directories."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from babai_ao import BabaiError, cli
from babai_ao.cli.depth import Depth
from babai_ao.cli.output import atomic_directory
from babai_ao.cli.runs import RUN_FILE

SMALL_CALIB = ["--calib-windows", "2", "--calib-len", "64"]
SMALL_EVAL = ["--windows", "1", "--seq-len", "128", "--no-progress"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("babai-ao")]
    assert len(lines) == 1, err
    assert lines[0].startswith("babai-ao: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def assert_quiet(err: str, seen: list[warnings.WarningMessage]) -> None:
    """``--no-progress``: no progress bar at all (transformers' included), and none of the
    dependency notes the CLI filters at their source."""
    assert "it/s]" not in err and "Loading weights" not in err, err
    assert not [w for w in seen if "LeafSpec" in str(w.message)]


# ---- argument errors: no model needed --------------------------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["quantize", "smollm2", "--bits", "5", "--out", "x"], "--bits"),
    (["quantize", "smollm2", "--group-size", "sixty", "--out", "x"], "--group-size"),
    (["quantize", "smollm2", "--group-size", "0", "--out", "x"], "must be positive"),
    (["quantize", "smollm2", "--clip", "maybe", "--out", "x"], "--clip"),
    (["quantize", "smollm2"], "--out"),
    (["eval", "smollm2", "--windows", "none"], "--windows"),
    (["export", "smollm2"], "--format"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_exit_2_with_one_line(capsys, argv, needle):
    code, out, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, needle)
    assert "--help" in err  # the fix: where the valid values are listed
    assert out == ""


def test_missing_model_and_existing_output(capsys, tmp_path):
    code, _, err = run_cli(capsys, "eval", str(tmp_path / "nowhere"))
    assert_one_line_error(code, err, "nowhere", "smollm2")
    code, _, err = run_cli(capsys, "quantize", str(tmp_path / "m.gguf"), "--out",
                           str(tmp_path / "o"))
    assert_one_line_error(code, err, "m.gguf", "does not exist")
    (tmp_path / "taken").mkdir()
    code, _, err = run_cli(capsys, "quantize", "smollm2", "--out", str(tmp_path / "taken"))
    assert_one_line_error(code, err, "already exists", "--overwrite")
    code, _, err = run_cli(capsys, "report", str(tmp_path / "taken"))
    assert_one_line_error(code, err, RUN_FILE)


def test_export_mode_must_match_format(capsys):
    code, _, err = run_cli(capsys, "export", "smollm2", "--format", "pte", "--mode", "qdq")
    assert_one_line_error(code, err, "weight_only")


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "babai-ao"
    res = subprocess.run([str(script), "--version"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "babai-ao 0.1.0"


# ---- interrupts leave nothing behind ----------------------------------------------------
def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_atomic_directory_interrupted_and_replaced(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt), atomic_directory(out, overwrite=False) as tmp:
        (tmp / "half.safetensors").write_bytes(b"x")
        raise KeyboardInterrupt
    assert _leftovers(tmp_path) == []
    with atomic_directory(out, overwrite=False) as tmp:
        (tmp / "a").write_text("first")
    with pytest.raises(BabaiError, match="--overwrite"), atomic_directory(out, False):
        pass
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "b").write_text("second")
    assert _leftovers(tmp_path) == ["run"] and _leftovers(out) == ["b"]


def test_ctrl_c_during_save_exits_130_and_leaves_no_directory(capsys, tmp_path, monkeypatch):
    class Tok:
        pass

    from babai_ao.cli import quantize as command  # `babai-ao quantize`

    monkeypatch.setattr(command, "load_measured",
                        lambda source, n=None: (object(), Tok(), Depth(None, None)))
    monkeypatch.setattr(command, "make_config", lambda args: None)
    monkeypatch.setattr(command, "quantize_loaded", lambda *a, **k: {"method": "babai"})

    def save(model, tokenizer, config, record, directory):
        (directory / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "save_run", save)
    code, _, err = run_cli(capsys, "quantize", "smollm2", "--out", str(tmp_path / "run"))
    assert code == 130 and "interrupted" in err
    assert _leftovers(tmp_path) == []


# ---- end to end on SmolLM2 (2 blocks) ------------------------------------------------------
@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli_runs")


@pytest.fixture(scope="module")
def babai_run(runs_dir):
    out = runs_dir / "babai-w4g64"
    code = cli.main(["quantize", "smollm2", "--num-layers", "2", "--bits", "4",
                     "--group-size", "64", "--order", "act", "--mode", "sequential",
                     *SMALL_CALIB, "--out", str(out), "--no-progress"])
    assert code == 0
    return out


@pytest.mark.model
def test_quantize_writes_checkpoint_and_record(babai_run, runs_dir):
    assert sorted(p.name for p in runs_dir.iterdir()) == ["babai-w4g64"]  # no temp dirs
    names = {p.name for p in babai_run.iterdir()}
    assert RUN_FILE in names and "config.json" in names
    assert any(n.endswith(".safetensors") for n in names)
    record = json.loads((babai_run / RUN_FILE).read_text())
    assert record["method"] == "babai" and record["bits"] == 4
    assert len(record["layers"]) == 2 * 7  # q k v o gate up down per block
    for row in record["layers"]:
        assert row["error"] >= 0 and row["bound"] > 0 and row["trace_d"] > 0
    # 4-bit codes + fp16 scale and 4-bit zero per 64 weights = 4.3125 bits
    assert record["avg_bits_per_weight"] == pytest.approx(4 + 16 / 64 + 4 / 64, abs=0.02)
    # what stayed float is recorded: the tied embedding is most of it, norms the rest
    floats = record["float_parameters"]
    assert set(floats) == {"embedding", "norm"} and record["quantized_parameters"] > 0
    assert floats["embedding"] == 49152 * 576


@pytest.mark.model
def test_eval_saved_run_records_perplexity(capsys, babai_run):
    code, out, err = run_cli(capsys, "eval", str(babai_run), *SMALL_EVAL,
                             "--generate", "Hello", "--new-tokens", "3")
    assert code == 0, err
    assert_quiet(err, [])
    ppl = float(re.search(r"perplexity ([0-9.]+)", out).group(1))
    assert ppl > 1
    assert "'Hello' ->" in out
    record = json.loads((babai_run / RUN_FILE).read_text())
    assert record["ppl"] == pytest.approx(ppl, rel=1e-3) and record["windows"] == 1


@pytest.mark.model
def test_export_onnx_runs_and_matches_eager(capsys, babai_run, tmp_path):
    path = tmp_path / "m.onnx"
    code, out, err = run_cli(capsys, "export", str(babai_run), "--format", "onnx",
                             "--out", str(path), "--seq-len", "8")
    assert code == 0, err
    assert path.is_file()
    diff = float(re.search(r"max\|diff\| vs eager ([0-9.e+-]+)", out).group(1))
    assert "14 quantized linears" in out
    assert diff < 1e-2


@pytest.mark.model
def test_export_onnx_quantized_embedding(capsys, tmp_path):
    """--quantize-embedding 4: the tied table in 4 bits (lookup + lm_head), still exact."""
    path = tmp_path / "m.onnx"
    code, out, err = run_cli(capsys, "export", "smollm2", "--num-layers", "1", "--format",
                             "onnx", "--quantize-embedding", "4", "--out", str(path),
                             "--seq-len", "8")
    assert code == 0, err
    diff = float(re.search(r"max\|diff\| vs eager ([0-9.e+-]+)", out).group(1))
    assert "1 quantized linears" in out  # the tied lm_head (the decoder stays float here)
    assert diff < 1e-2
    # the float32 table alone is 49152 × 576 × 4 B = 108 MiB; here: 4-bit lookup (15.4 MiB)
    # + 4-bit lm_head (14.6 MiB) + one float32 block (13.5 MiB)
    assert path.stat().st_size < 48 * 2**20
    code, _, err = run_cli(capsys, "export", "smollm2", "--num-layers", "1", "--format", "pte",
                           "--quantize-embedding", "4", "--embedding-group-size", "100",
                           "--out", str(tmp_path / "m.pte"))
    assert_one_line_error(code, err, "--embedding-group-size 100", "embedding dimension 576")


@pytest.mark.model
def test_group_size_not_dividing_is_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "quantize", "smollm2", "--num-layers", "1", "--mode", "rtn",
                           "--group-size", "100", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "--group-size 100", "in_features 576")
    assert _leftovers(tmp_path) == []


@pytest.mark.model
def test_missing_calibration_file_is_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "quantize", "smollm2", "--num-layers", "1",
                           "--calib-file", str(tmp_path / "nope.txt"), "--out",
                           str(tmp_path / "o"))
    assert_one_line_error(code, err, "nope.txt")
    assert _leftovers(tmp_path) == []


@pytest.mark.model
def test_report_two_runs_writes_table_and_plots(capsys, babai_run, runs_dir):
    rtn = runs_dir / "rtn-w4g64"
    assert cli.main(["quantize", "smollm2", "--num-layers", "2", "--mode", "rtn",
                     "--out", str(rtn), "--no-progress"]) == 0
    for run in (babai_run, rtn):
        assert cli.main(["eval", str(run), *SMALL_EVAL]) == 0
    capsys.readouterr()
    out_dir = runs_dir / "report"
    code, out, err = run_cli(capsys, "report", str(babai_run), str(rtn), "--out", str(out_dir))
    assert code == 0, err
    files = {p.name for p in out_dir.iterdir()}
    assert {"report.md", "bits_vs_ppl.png", "error_vs_bound_babai-w4g64.png",
            "error_vs_bound_rtn-w4g64.png"} <= files
    for name in files - {"report.md"}:
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out_dir / "report.md").read_text()
    assert md.count("| model.layers.1.mlp.down_proj |") == 2
    assert "| layer | tr(D) | error E | bound B |" in out


@pytest.mark.model
def test_demo_small(capsys, tmp_path):
    out = tmp_path / "demo"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        code, stdout, err = run_cli(
            capsys, "demo", "--out", str(out), "--num-layers", "2", *SMALL_CALIB, "--windows",
            "1", "--seq-len", "128", "--export-layers", "1", "--new-tokens", "2", "--no-progress")
    assert code == 0, err
    assert_quiet(err, seen)
    assert "compiled tokens == eager tokens: True" in stdout
    for name in ("float", "rtn-w4g64", "babai-w4g64-act-seq"):
        assert re.search(rf"{name} +[0-9.]+", stdout), stdout
    diffs = [float(d) for d in re.findall(r"max\|diff\| vs eager ([0-9.e+-]+)", stdout)]
    assert len(diffs) == 2 and max(diffs) < 1e-2
    files = {p.name for p in out.iterdir()}
    assert {"report.md", "bits_vs_ppl.png", "babai-w4g64-1blocks.pte",
            "babai-w4g64-1blocks.onnx", "babai-w4g64-act-seq", "rtn-w4g64"} <= files
    assert _leftovers(tmp_path) == ["demo"]


@pytest.mark.model
def test_quantize_hessian_tiles_by_default(capsys, tmp_path, monkeypatch):
    """Hessians are formed tile-wise by default and plainly with ``--no-hessian-tiles``
    (recorded in the run either way); the flag is refused where no Hessian is formed."""
    from babai_ao.lattice import hessian

    calls = []
    tiled = hessian.add_gram_tiles_

    def counted(*args, **kwargs):
        calls.append(1)
        return tiled(*args, **kwargs)
    monkeypatch.setattr(hessian, "add_gram_tiles_", counted)
    for flag, out in (((), "t"), (("--no-hessian-tiles",), "p")):
        calls.clear()
        code, _, err = run_cli(capsys, "quantize", "smollm2", "--num-layers", "1", *flag,
                               *SMALL_CALIB, "--out", str(tmp_path / out), "--no-progress")
        assert code == 0, err
        assert bool(calls) == (not flag)  # the tiled Gram product ran, or did not
        assert json.loads((tmp_path / out / RUN_FILE).read_text())["hessian_tiles"] == (not flag)
    code, _, err = run_cli(capsys, "quantize", "smollm2", "--mode", "rtn", "--hessian-tiles",
                           "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "apply to calibration (--mode sequential or observe)")


@pytest.mark.model
def test_quantize_allocate_spreads_the_budget(capsys, tmp_path):
    """One-λ allocation, the default of ``--clip hptq --target-bits`` (no flag given):
    per-layer HPTQ targets from one λ (recorded), each layer quantized at its own target, the
    stored average at the budget, every bound still certified; an explicit ``--allocate`` is
    refused one line at a time where it cannot run."""
    out = tmp_path / "lam"
    code, stdout, err = run_cli(capsys, "quantize", "smollm2", "--num-layers", "1", "--clip",
                                "hptq", "--target-bits", "3.3",
                                "--fisher-windows", "2", *SMALL_CALIB, "--out", str(out),
                                "--no-progress")
    assert code == 0, err
    assert "E <= B on 7/7 unclipped layers" in stdout
    record = json.loads((out / RUN_FILE).read_text())
    alloc = record["allocation"]
    targets = {p["name"]: p["target_bits"] for p in alloc["layers"]}
    assert alloc["budget"] == 3.3 and len(targets) == 7
    assert alloc["target_bits_max"] - alloc["target_bits_min"] > 0.5  # not one rate for all
    stored = {r["name"]: r["bits_per_weight"] for r in record["layers"]}
    for name, target in targets.items():  # each layer hit its own target, not the budget
        assert stored[name] == pytest.approx(target, abs=0.15), name
    assert record["avg_bits_per_weight"] == pytest.approx(3.3, abs=0.05)
    assert all(r["bound_holds"] for r in record["layers"])
    for extra, message in ((("--clip", "true"), "add --clip hptq --target-bits"),
                           (("--clip", "hptq", "--target-bits", "3.3", "--mode", "rtn"),
                            "needs calibration data"),
                           (("--clip", "hptq", "--target-bits", "3.3", "--stream"),
                            "drop --stream/--save-state or --allocate"),
                           (("--clip", "hptq", "--target-bits", "3.3", "--nproc", "2"),
                            "drop --nproc or --allocate")):
        code, _, err = run_cli(capsys, "quantize", "smollm2", "--allocate", *extra,
                               "--out", str(tmp_path / "x"))
        assert_one_line_error(code, err, message)


@pytest.mark.model
def test_quantize_tune_lr_reaches_the_optimizer(capsys, tmp_path, monkeypatch):
    """``--tune STEPS --tune-lr LR``: every block is tuned with that learning rate (seen by
    ``tune_block``) and the run record keeps it; ``--tune-lr`` alone or not positive is
    refused in one line."""
    from babai_ao.calibration import sequential

    seen = []
    real = sequential.tune_block

    def spy(block, reference, inputs, hessians, damp, settings):
        seen.append(settings)
        return real(block, reference, inputs, hessians, damp, settings)

    monkeypatch.setattr(sequential, "tune_block", spy)
    out = tmp_path / "tuned"
    code, _, err = run_cli(capsys, "quantize", "smollm2", "--num-layers", "1", "--tune", "2",
                           "--tune-lr", "0.004", *SMALL_CALIB, "--out", str(out), "--no-progress")
    assert code == 0, err
    assert [(t.steps, t.lr) for t in seen] == [(2, 0.004)]
    record = json.loads((out / RUN_FILE).read_text())
    assert (record["tune_steps"], record["tune_lr"]) == (2, 0.004)
    for extra, message in ((("--tune-lr", "0.01"), "nothing to set without --tune"),
                           (("--tune", "2", "--tune-lr", "-1"), "positive finite")):
        code, _, err = run_cli(capsys, "quantize", "smollm2", *extra, "--out",
                               str(tmp_path / "x"))
        assert_one_line_error(code, err, message)


@pytest.mark.model
def test_quantize_hptq_sequential_from_the_command_line(capsys, tmp_path):
    """The README's best format with sequential calibration, from the CLI (was refused);
    ``--no-allocate``: every layer's own rate search at the budget, no allocation pass."""
    out = tmp_path / "hptq"
    code, stdout, err = run_cli(capsys, "quantize", "smollm2", "--num-layers", "1", "--clip",
                                "hptq", "--target-bits", "3.3", "--mode", "sequential",
                                "--no-allocate", *SMALL_CALIB, "--out", str(out),
                                "--no-progress")
    assert code == 0, err
    assert "E <= B on 7/7 unclipped layers" in stdout
    record = json.loads((out / RUN_FILE).read_text())
    assert "allocation" not in record
    assert record["mode"] == "sequential" and record["clip"] == "hptq"
    assert record["avg_bits_per_weight"] == pytest.approx(3.3, abs=0.05)
    assert all(r["bound_holds"] for r in record["layers"])


@pytest.mark.parametrize("extra,on,note", [
    ({}, True, None),
    ({"mode": "observe"}, True, None),
    ({"mode": "rtn"}, False, None),
    ({"clip": "true", "target_bits": None}, False, None),
    ({"target_bits": None}, False, None),
    ({"stream": True}, False, "--stream/--save-state"),
    ({"save_state": "s.pt"}, False, "--stream/--save-state"),
    ({"nproc": 2}, False, "--nproc"),
    ({"allocate": False}, False, None),
])
def test_allocation_default_is_on_where_it_can_run(capsys, extra, on, note):
    """Unset ``--allocate`` resolves to on for an HPTQ budget calibrated in one unstreamed
    process, off elsewhere; off because of streaming or ranks, one line on stderr says so."""
    from babai_ao.cli import preflight

    args = argparse.Namespace(**{"allocate": None, "clip": "hptq", "target_bits": 3.3,
                                 "mode": "sequential", "stream": False, "save_state": None,
                                 "nproc": 1, "fisher_windows": 16, **extra})
    preflight._allocation(args)
    assert args.allocate is on
    err = capsys.readouterr().err
    assert (note in err and len(err.strip().splitlines()) == 1) if note else err == ""
