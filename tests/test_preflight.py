"""Arguments checked before any work: one line and exit 2, or the command runs.

``babai_ao.cli.preflight`` reads the arguments, file headers and the model's config, never
its weights. The property test drives the real parser and pre-flight with random argument
combinations, the commands themselves replaced by a stub that records they were reached:
every outcome is exit 0 (the command would run) or exit 2 with one line
``babai-ao: error: …`` — never a traceback, never an output directory.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from babai_ao.cli import app as cli_main

COMMANDS = ("cmd_quantize", "cmd_eval", "cmd_export", "cmd_demo", "cmd_report")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny transformers model directory, a fake .gguf, text and binary files."""
    from transformers import LlamaConfig

    root = tmp_path_factory.mktemp("preflight")
    model = root / "tiny"
    LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=1024).save_pretrained(model)
    (root / "fake.gguf").write_text("not a gguf file")
    (root / "text.txt").write_text("some calibration text\n" * 50)
    (root / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (root / "empty.txt").write_text("")
    (root / "existing").mkdir()
    return {"root": root, "model": model, "fake_gguf": root / "fake.gguf",
            "text": root / "text.txt", "binary": root / "binary.bin",
            "empty": root / "empty.txt", "existing": root / "existing"}


def run(argv: list[str], monkeypatch) -> tuple[int, str, list[str]]:
    """``main(argv)`` with each command replaced by a stub; (exit, stderr, commands run)."""
    reached: list[str] = []
    for name in COMMANDS:
        monkeypatch.setattr(cli_main, name, lambda args, n=name: reached.append(n) or 0)
    err = io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = cli_main.main(argv)
    finally:
        torch.set_num_threads(threads)
    return code, err.getvalue(), reached


def assert_outcome(code: int, err: str, reached: list[str]) -> None:
    assert "Traceback" not in err, err
    if code == 0:
        assert len(reached) == 1
        return
    assert code == 2 and not reached, (code, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("babai-ao: error: "), err


@pytest.mark.parametrize("argv, needle", [
    (["quantize", "{model}", "--out", "{root}/q", "--group-size", "100"], "does not divide"),
    (["quantize", "{model}", "--out", "{root}/q", "--group-size", "64"], "in_features 96"),
    (["quantize", "{model}", "--out", "{root}/q", "--calib-len", "100000"], "context of 1024"),
    (["quantize", "{model}", "--out", "{root}/q", "--num-layers", "4"], "1..3 decoder blocks"),
    (["quantize", "{fake_gguf}", "--out", "{root}/q"], "not a GGUF file"),
    (["quantize", "{model}", "--out", "{root}/q", "--clip", "false"], "cannot store"),
    (["quantize", "{model}", "--out", "{root}/q", "--clip", "ssqr", "--target-bits", "4"],
     "dense cost"),
    (["quantize", "{model}", "--out", "{root}/q", "--clip", "hptq", "--target-bits", "12"],
     "1..8"),
    (["quantize", "{model}", "--out", "{root}/q", "--calib-file", "{binary}"], "UTF-8"),
    (["quantize", "{model}", "--out", "{root}/q", "--calib-file", "{empty}"], "empty"),
    (["quantize", "{model}", "--out", "{existing}"], "already exists"),
    (["quantize", "{model}", "--out", "{root}/q", "--nproc", "0"], "--nproc 0"),
    (["quantize", "{model}", "--out", "{root}/q", "--nproc", "2", "--mode", "rtn"],
     "has none"),
    (["quantize", "{model}", "--out", "{root}/q", "--nproc", "3", "--calib-windows", "16"],
     "--calib-windows 24"),
    (["quantize", "{model}", "--out", "{root}/q", "--nproc", "2", "--dist-timeout", "0"],
     "--dist-timeout 0"),
    (["eval", "{model}", "--seq-len", "-5"], "--seq-len -5"),
    (["eval", "{model}", "--seq-len", "2048"], "context of 1024"),
    (["eval", "{model}", "--data-file", "{root}/missing.txt"], "not a file"),
    (["export", "{model}", "--format", "onnx", "--out", "{root}/m.pte"], "does not end in"),
    (["export", "{model}", "--format", "pte", "--quantize-embedding", "4",
      "--embedding-group-size", "64"], "embedding dimension 96"),
    (["--threads", "0", "eval", "{model}"], "--threads 0"),
])
def test_bad_arguments_fail_before_any_work(argv, needle, files, monkeypatch) -> None:
    argv = [a.format(**files) for a in argv]
    code, err, reached = run(argv, monkeypatch)
    assert_outcome(code, err, reached)
    assert code == 2 and needle in err, err
    assert not (files["root"] / "q").exists()


def test_good_arguments_reach_the_command(files, monkeypatch) -> None:
    for argv in (["quantize", str(files["model"]), "--out", str(files["root"] / "q"),
                  "--group-size", "32", "--calib-len", "256", "--calib-file", str(files["text"]),
                  "--clip", "ssqr", "--target-bits", "4.8"],
                 ["eval", str(files["model"]), "--seq-len", "256", "--num-layers", "3"],
                 ["export", str(files["model"]), "--format", "onnx", "--out",
                  str(files["root"] / "m.onnx"), "--quantize-embedding", "4",
                  "--embedding-group-size", "32"]):
        code, err, reached = run(argv, monkeypatch)
        assert code == 0 and len(reached) == 1, err


INTS = st.sampled_from([-3, 0, 1, 2, 3, 4, 16, 32, 48, 100, 1024, 1025, 100000])
FLOATS = st.sampled_from([-1.0, 0.0, 0.005, 0.5, 2.5, 3.3, 4.0, 4.8, 9.0, float("nan")])


@st.composite
def argvs(draw, files: dict[str, Path]) -> list[str]:
    model = draw(st.sampled_from([str(files["model"]), str(files["fake_gguf"]),
                                  str(files["root"] / "nothing"), str(files["text"])]))
    command = draw(st.sampled_from(["quantize", "eval", "export", "demo", "report"]))
    opt = {
        "quantize": ["--bits", "--group-size", "--order", "--clip", "--target-bits",
                     "--outlier-density", "--refine", "--mode", "--calib-windows",
                     "--calib-len", "--calib-file", "--num-layers", "--overwrite", "--nproc",
                     "--dist-timeout"],
        "eval": ["--windows", "--seq-len", "--data-file", "--generate", "--new-tokens",
                 "--num-layers"],
        "export": ["--format", "--mode", "--out", "--seq-len", "--num-layers",
                   "--quantize-embedding", "--embedding-group-size"],
        "demo": ["--calib-windows", "--calib-len", "--windows", "--seq-len", "--num-layers",
                 "--export-layers", "--new-tokens", "--overwrite"],
        "report": ["--float-ppl"],
    }[command]
    values = {
        "--bits": st.sampled_from(["2", "3", "4", "5", "8", "x"]),
        "--group-size": st.sampled_from(["none", "16", "32", "48", "64", "100", "-1", "0"]),
        "--order": st.sampled_from(["act", "natural", "min-pivot", "bogus"]),
        "--clip": st.sampled_from(["true", "false", "ssqr", "hptq", "maybe"]),
        "--mode": st.sampled_from(["sequential", "observe", "rtn", "qdq", "8da4w", "weight_only"]),
        "--format": st.sampled_from(["pte", "onnx", "gguf"]),
        "--quantize-embedding": st.sampled_from(["none", "4", "8"]),
        "--windows": st.sampled_from(["all", "0", "2", "-1", "x"]),
        "--calib-file": st.sampled_from([str(files[k]) for k in ("text", "binary", "empty")]),
        "--data-file": st.sampled_from([str(files[k]) for k in ("text", "binary")]),
        "--out": st.sampled_from([str(files["root"] / n) for n in ("o.onnx", "o.pte", "o.txt")]),
        "--generate": st.sampled_from(["hello", " "]),
        "--target-bits": FLOATS.map(str), "--outlier-density": FLOATS.map(str),
        "--float-ppl": FLOATS.map(str), "--dist-timeout": FLOATS.map(str),
    }
    argv = [command] + ([] if command in ("demo", "report") else [model])
    if command == "report":
        argv.append(str(files["root"] / "no-run"))
    if command in ("quantize", "demo"):
        argv += ["--out", str(files["root"] / draw(st.sampled_from(["new", "existing"])))]
    if command == "export" and "--format" not in argv:
        argv += ["--format", draw(st.sampled_from(["pte", "onnx"]))]
    for flag in draw(st.lists(st.sampled_from(opt), max_size=5, unique=True)):
        if flag == "--overwrite":
            argv.append(flag)
        elif flag == "--format":
            continue  # given above
        else:
            argv += [flag, draw(values.get(flag, INTS.map(str)))]
    return argv


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_arguments_exit_0_or_one_line_2(data, files, monkeypatch) -> None:
    argv = data.draw(argvs(files))
    code, err, reached = run(argv, monkeypatch)
    assert_outcome(code, err, reached)
    assert not (files["root"] / "new").exists()
