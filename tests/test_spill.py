"""Streamed calibration with its activations spilled to disk (``calibration.spill``) and the
glibc allocator settings (``calibration.allocator``).

References: the in-memory ``quantize_model`` of the same float model (codes, scales, every
stored tensor bit for bit), and the tensors written to the spill file (read back bit for
bit). Spill files are checked while the run is on (``on_block``) and after it (none left,
also after an error or Ctrl-C).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import babai_ao
from babai_ao.calibration import allocator
from babai_ao.calibration.sequential import quantize_model
from babai_ao.calibration.spill import PREFIX, SpillDir, SpilledInputs
from babai_ao.calibration.streaming import BlockStream, SafetensorsSource, empty_model
from babai_ao.errors import BabaiError


def test_spilled_tensors_read_back_bit_for_bit(tmp_path):
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(3, 5, generator=g)
    inputs = [(torch.randn(2, 7, 5, generator=g).to(dtype), (shared,), {"m": None, "k": i})
              for i, dtype in enumerate((torch.float32, torch.bfloat16, torch.float64))]
    inputs.append((torch.randn(5, 2, 7, generator=g).transpose(0, 2), (shared,), {}))  # strided
    spill = SpillDir(tmp_path)
    got = spill.spill("a.bin", inputs)
    assert isinstance(got, SpilledInputs) and len(got) == len(inputs)
    assert (spill.path / "a.bin").stat().st_size == got.nbytes == sum(
        h.numel() * h.element_size() for h, _, _ in inputs)
    for (h, _args, kwargs), (h2, args2, kwargs2) in zip(inputs, got, strict=True):
        assert h2.dtype == h.dtype and torch.equal(h2, h)
        assert args2[0] is shared and kwargs2 == kwargs  # kept in memory, not copied
    assert torch.equal(got[-1][0], inputs[-1][0])
    assert spill.path.name.startswith(PREFIX) and spill.path.parent == tmp_path
    spill.close()
    assert not spill.path.exists() and spill.closed and list(tmp_path.iterdir()) == []
    spill.close()  # idempotent


def test_spill_dir_must_exist(tmp_path):
    with pytest.raises(BabaiError, match="does not exist") as e:
        SpillDir(tmp_path / "nope")
    assert "\n" not in str(e.value)
    with pytest.raises(BabaiError, match="lean=True"):
        BlockStream(None, spill=True, lean=False)  # type: ignore[arg-type]


def test_allocator_settings_on_glibc_and_elsewhere(monkeypatch):
    import platform

    if platform.libc_ver()[0] == "glibc":
        assert allocator.fix_mmap_threshold() is True
        allocator.trim()  # returns whether memory was released: either is fine
        assert allocator.settle_mmap_threshold() is True
    allocator._libc.cache_clear()
    monkeypatch.setattr(platform, "libc_ver", lambda: ("musl", "1.2"))
    try:
        assert allocator._libc() is None
        assert allocator.fix_mmap_threshold() is False and allocator.trim() is False
        assert allocator.settle_mmap_threshold() is False
    finally:
        allocator._libc.cache_clear()


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_small, calibration_small):
    """The in-memory run: the 2-block SmolLM2 quantized whole (the codes to match)."""
    model = copy.deepcopy(smollm2_small[0])
    config = babai_ao.babai_config(bits=4, group_size=64, order="act")
    report = quantize_model(model, config, calibration_small, progress=False, batch_size=1)
    return {k: v for k, v in model.model.layers.state_dict().items()}, report


class _Collect:
    """A ``BlockSink`` that keeps each finished block's tensors (copies)."""

    def __init__(self) -> None:
        self.blocks: dict[str, torch.Tensor] = {}

    def write_block(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        self.blocks.update({k.removeprefix("model.layers."): v for k, v in tensors.items()})


@pytest.mark.parametrize("spill", [True, False])
def test_spilled_stream_gives_the_in_memory_codes_on_smollm2(
        smollm2_small, calibration_small, smollm2_reference, tmp_path, spill):
    """2-block SmolLM2 streamed from its fp32 safetensors (4 windows × 128, batches of 1):
    spilled (default) and in-memory streams store the very tensors of the in-memory run;
    while a block is calibrated its inputs are a file of ``n·T·d·4`` bytes in the spill dir;
    afterwards the dir is gone."""
    from babai_ao.calibration.models import fp32_copy_dir

    want, ref_report = smollm2_reference
    hf = copy.deepcopy(smollm2_small[0].config)
    model = empty_model(hf)
    sink = _Collect()
    seen: dict[int, list[tuple[str, int]]] = {}
    stream = BlockStream(SafetensorsSource(fp32_copy_dir()), sink, spill=None if spill else False,
                         spill_dir=tmp_path, on_block=lambda b, _m: seen.__setitem__(
                             b, [(p.name, p.stat().st_size) for p in sorted(
                                 (stream.spill_path or tmp_path).glob("acts-*"))]))
    config = babai_ao.babai_config(bits=4, group_size=64, order="act")
    report = quantize_model(model, config, calibration_small, progress=False, batch_size=1,
                            stream=stream)
    hidden = calibration_small.numel() * hf.hidden_size * 4
    if spill:
        assert seen == {0: [("acts-0.bin", hidden)], 1: [("acts-1.bin", hidden)]}
    else:
        assert seen == {0: [], 1: []}
    assert list(tmp_path.iterdir()) == [] and stream.spill_path is None  # removed
    assert set(sink.blocks) == set(want)
    for k in want:
        assert torch.equal(sink.blocks[k], want[k]), k
    assert [(r.name, r.error, r.bound) for r in report.rows] == [
        (r.name, r.error, r.bound) for r in ref_report.rows]


@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError])
def test_spill_dir_removed_after_an_error_or_ctrl_c(tmp_path, failure):
    """A run stopped in block 1 (Ctrl-C or an error) removes its spill directory; before the
    stop, block 1's inputs were on disk there."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=32)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "float")
    spill_root = tmp_path / "spill"
    spill_root.mkdir()
    before: list[str] = []

    def stop(b: int, _m) -> None:
        if b == 1:
            before.extend(p.name for p in stream.spill_path.iterdir())
            raise failure("stop")

    stream = BlockStream(SafetensorsSource(tmp_path / "float"), spill_dir=spill_root,
                         on_block=stop)
    with pytest.raises(failure):
        quantize_model(empty_model(cfg), babai_ao.babai_config(bits=4, group_size=32),
                       torch.randint(0, 64, (2, 16)), progress=False, batch_size=1,
                       stream=stream)
    assert before == ["acts-1.bin"]
    assert list(spill_root.iterdir()) == []


def test_cli_spill_dir_flag(tmp_path, capsys):
    """``--spill-dir`` must be an existing directory and is for streamed runs only."""
    from babai_ao.cli.app import main

    for extra, problem in ((["--stream", "--spill-dir", str(tmp_path / "no")], "--spill-dir"),
                           (["--spill-dir", str(tmp_path)], "--stream")):
        assert main(["quantize", "smollm2", "--out", str(tmp_path / "o"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert problem in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_record_says_where_activations_spill():
    """The record's ``stream`` entry states the spill setting (read by the CLI run record)."""
    s = BlockStream(None)  # type: ignore[arg-type]
    assert s.spill is True and s.lean is True and s.allocator == allocator.DEFAULT
    with pytest.raises(BabaiError, match="allocator"):
        BlockStream(None, allocator="jemalloc")  # type: ignore[arg-type]
    assert BlockStream(None, lean=False).spill is False  # type: ignore[arg-type]
    assert Path(PREFIX).name == ".babai-spill-"


def _tiny(tmp_path: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "float")
    return cfg, model


@pytest.mark.parametrize("kwargs", [{"mode": "observe"},
                                    {"tune": "steps"}], ids=["observe", "tuned"])
def test_spilled_stream_equals_in_memory_in_observe_mode_and_with_tuning(tmp_path, kwargs):
    """The other paths that produce a block's outputs (observe's float forward, block
    tuning's kept forward) spill them too, with the in-memory run's codes and scales."""
    from babai_ao.calibration.tuning import TuneSettings

    if "tune" in kwargs:
        kwargs = {"tune": TuneSettings(steps=4, lr=1e-3, windows=1)}
    cfg, model = _tiny(tmp_path)
    calib = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(2))
    config = babai_ao.babai_config(bits=4, group_size=32)
    report = quantize_model(model, config, calib, progress=False, batch_size=1, **kwargs)
    sink = _Collect()
    spill_root = tmp_path / "spill"
    spill_root.mkdir()
    streamed = quantize_model(empty_model(cfg), config, calib, progress=False, batch_size=1,
                              stream=BlockStream(SafetensorsSource(tmp_path / "float"), sink,
                                                 spill_dir=spill_root), **kwargs)
    want = model.model.layers.state_dict()
    assert set(sink.blocks) == set(want)
    assert all(torch.equal(sink.blocks[k], want[k]) for k in want)
    assert [r.error for r in streamed.rows] == [r.error for r in report.rows]
    assert streamed.tuning == report.tuning
    assert list(spill_root.iterdir()) == []
