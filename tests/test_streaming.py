"""Streamed calibration (issue 19): a meta-device model whose blocks are read from the
checkpoint one at a time, written shard by shard, resumable after a crash.

The reference is the in-memory path on the same float model: ``quantize_model`` then
``hf.save_pretrained``. A tiny random Llama (3 blocks) saved as safetensors keeps it fast;
SmolLM2's own GGUF checks the GGUF source against transformers' GGUF loader.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import babai_ao
from babai_ao.calibration import lockstep
from babai_ao.calibration.resume import CalibrationState
from babai_ao.calibration.sequential import quantize_model
from babai_ao.calibration.streaming import (
    BlockStream,
    GGUFSource,
    SafetensorsSource,
    empty_model,
    open_source,
)
from babai_ao.checkpoints.hf import from_pretrained, save_pretrained, verify_checkpoint
from babai_ao.checkpoints.streamed import INDEX_FILE, ShardWriter, stored_bits_per_weight
from babai_ao.errors import BabaiError

BLOCKS = 3


def _config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=BLOCKS, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=128, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory) -> Path:
    """A random tiny Llama saved as safetensors (the streamed source)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(), dtype=torch.float32)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return torch.randint(0, 320, (6, 24), generator=torch.Generator().manual_seed(1))


def _babai():
    return babai_ao.babai_config(bits=4, group_size=32)


def _tensors(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors, metadata = {}, {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            metadata.update(h.metadata() or {})
            tensors.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118
    return tensors, metadata


def _streamed(float_dir: Path, calib: torch.Tensor, out: Path, **stream_kwargs):
    model = empty_model(_config_of(float_dir))
    source = open_source(float_dir, model)
    sink = ShardWriter(stream_kwargs.pop("work", out), BLOCKS)
    config = _babai()
    report = quantize_model(model, config, calib, progress=False, batch_size=4,
                            stream=BlockStream(source, sink, **stream_kwargs))
    sink.commit(model, source, out, config, "model.layers")
    return model, report


def _config_of(path: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


@pytest.fixture(scope="module")
def in_memory(float_dir, calib, tmp_path_factory):
    """The reference: the float model loaded whole, quantized in place, saved."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32).eval()
    config = _babai()
    report = quantize_model(model, config, calib, progress=False, batch_size=4)
    out = tmp_path_factory.mktemp("memory")
    save_pretrained(model, out, config)
    return out, report


def test_streamed_checkpoint_equals_in_memory_one(float_dir, calib, in_memory, tmp_path):
    ref_dir, ref_report = in_memory
    out = tmp_path / "streamed"
    model, report = _streamed(float_dir, calib, out)
    got, got_meta = _tensors(out)
    want, want_meta = _tensors(ref_dir)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k  # codes, scales, zeros, float norms, embedding
    assert got_meta == want_meta  # entries (with digests) and tensor_names
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (ref_dir / "config.json").read_text())
    assert [(r.name, r.error, r.bound) for r in report.rows] == [
        (r.name, r.error, r.bound) for r in ref_report.rows]
    assert report.float_parameters == ref_report.float_parameters
    assert report.quantized_parameters == ref_report.quantized_parameters
    assert all(p.is_meta for p in model.parameters())  # nothing left in memory
    # one shard per block plus the rest, indexed; loadable and verifiable
    index = json.loads((out / INDEX_FILE).read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(
        p.name for p in out.glob("*.safetensors"))
    assert len(list(out.glob("*.safetensors"))) == BLOCKS + 1
    assert verify_checkpoint(out) == 7 * BLOCKS
    ids = calib[:2]
    with torch.no_grad():
        a = from_pretrained(out)(ids).logits
        b = from_pretrained(ref_dir)(ids).logits
    assert torch.equal(a, b)
    from transformers import AutoModelForCausalLM  # plain transformers, babai_ao imported

    plain = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, a)
    assert stored_bits_per_weight(out) == pytest.approx(stored_bits_per_weight(ref_dir))
    assert stored_bits_per_weight(out) > 4


def test_lean_stream_reruns_and_a_lockstep_stream_gives_the_same_checkpoint(
        float_dir, calib, in_memory, tmp_path):
    """The default (lean) stream calibrates on the rerun path, no block in lockstep;
    ``lean=False`` runs every block in lockstep, as the in-memory reference does: all three
    checkpoints hold the same tensors."""
    ref_dir, _ = in_memory
    want, _ = _tensors(ref_dir)
    for lean, in_lockstep in ((True, 0), (False, BLOCKS)):
        before = lockstep.BLOCKS_RUN
        _streamed(float_dir, calib, tmp_path / f"lean-{lean}", lean=lean)
        assert lockstep.BLOCKS_RUN - before == in_lockstep
        got, _ = _tensors(tmp_path / f"lean-{lean}")
        assert set(got) == set(want)
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_only_the_current_block_is_in_memory(float_dir, calib, tmp_path):
    seen: list[int] = []

    def check(b: int, model) -> None:
        for i, block in enumerate(model.model.layers):
            on_meta = {p.is_meta for p in block.parameters()}
            assert on_meta == ({False} if i == b else {True}), (b, i, on_meta)
        assert model.model.embed_tokens.weight.is_meta and model.model.norm.weight.is_meta
        hooks.append(model.model.layers[b].self_attn.q_proj.register_forward_pre_hook(
            lambda _m, _a: seen.append(b) if all(
                p.is_meta for i, blk in enumerate(model.model.layers) if i != b
                for p in blk.parameters()) else None))

    hooks: list = []
    _streamed(float_dir, calib, tmp_path / "out", on_block=check)
    for h in hooks:
        h.remove()
    assert sorted(set(seen)) == list(range(BLOCKS))  # calibration forwards ran with the rest on meta


def test_interrupted_run_leaves_nothing_complete_and_resumes_to_same_codes(
        float_dir, calib, in_memory, tmp_path):
    state_dir = tmp_path / "state"
    out = tmp_path / "out"

    def crash(b: int, _model) -> None:
        if b == 2:
            raise KeyboardInterrupt  # killed while calibrating the last block

    with pytest.raises(KeyboardInterrupt):
        _streamed(float_dir, calib, out, work=state_dir / "shards",
                  state=CalibrationState(state_dir), on_block=crash)
    assert not (out / INDEX_FILE).exists() and not (out / "config.json").exists()
    assert CalibrationState(state_dir).next_block == 2
    assert len(list((state_dir / "shards").glob("*.safetensors"))) == 2
    # the same run again resumes after block 1 and ends with the uninterrupted codes
    stream_state = CalibrationState(state_dir)
    model, report = _streamed(float_dir, calib, out, work=state_dir / "shards",
                              state=stream_state)
    got, got_meta = _tensors(out)
    want, want_meta = _tensors(in_memory[0])
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert got_meta == want_meta
    assert [r.name for r in report.rows] == [r.name for r in in_memory[1].rows]
    # commit linked the shards: the state still holds every finished block
    assert len(list((state_dir / "shards").glob("*.safetensors"))) == BLOCKS
    assert [r.error for r in report.rows] == [r.error for r in in_memory[1].rows]


def test_state_of_another_run_is_refused(float_dir, calib, tmp_path):
    state_dir = tmp_path / "state"

    def crash(b: int, _model) -> None:
        if b == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _streamed(float_dir, calib, tmp_path / "a", work=state_dir / "shards",
                  state=CalibrationState(state_dir), on_block=crash)
    with pytest.raises(BabaiError, match="another run"):
        _streamed(float_dir, calib[:, :20], tmp_path / "b", work=state_dir / "shards",
                  state=CalibrationState(state_dir))


def test_missing_or_misshapen_tensor_is_one_line_error(float_dir, calib, tmp_path):
    from safetensors.torch import save_file

    tensors, _ = _tensors(float_dir)
    broken = tmp_path / "missing"
    broken.mkdir()
    (broken / "config.json").write_text((float_dir / "config.json").read_text())
    save_file({k: v for k, v in tensors.items() if "layers.1.mlp.up_proj" not in k},
              broken / "model.safetensors")
    with pytest.raises(BabaiError, match=r"model\.layers\.1\.mlp\.up_proj\.weight is missing") \
            as e:
        _streamed(broken, calib, tmp_path / "o1")
    assert "\n" not in str(e.value)
    tensors["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(64, 32)
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(BabaiError, match=r"o_proj\.weight .* has shape \(64, 32\)") as e:
        _streamed(broken, calib, tmp_path / "o2")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "o1" / INDEX_FILE).exists()  # failed before any work


def test_gguf_source_reads_what_transformers_gguf_loader_reads():
    """SmolLM2's GGUF, read tensor by tensor (dequantized, q/k un-permuted), equals the float32
    copy that transformers' GGUF loader made of it."""
    from babai_ao.calibration.models import _fp32_copy, smollm2_gguf

    config = _config_of(_fp32_copy())  # made from the GGUF by transformers on first use
    config.num_hidden_layers = 1
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:1]
    model = empty_model(config)
    gguf = open_source(smollm2_gguf(), model)
    assert isinstance(gguf, GGUFSource)
    copy = SafetensorsSource(_fp32_copy())
    names = [n for n, _ in model.named_parameters()]
    assert set(names) <= gguf.names()
    for name in names:
        assert gguf.shape(name) == copy.shape(name), name
        assert torch.equal(gguf.read(name), copy.read(name)), name


def test_cli_stream_resumes_after_a_crash(float_dir, tmp_path, monkeypatch):
    """``babai-ao quantize --save-state``: a crash after block 1 leaves no --out and a state;
    the same command resumes, ends with the codes of an uninterrupted ``--stream`` run,
    and removes the state."""
    from transformers import AutoTokenizer

    from babai_ao.calibration.models import _fp32_copy
    from babai_ao.cli import main

    model_dir = tmp_path / "model"
    from transformers import AutoModelForCausalLM

    cfg = _config_of(float_dir)
    cfg.vocab_size = 49152  # SmolLM2's tokenizer (the calibration text is tokenized with it)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(_fp32_copy()).save_pretrained(model_dir)
    common = [str(model_dir), "--calib-windows", "4", "--calib-len", "16", "--group-size",
              "32", "--no-progress"]
    assert main(["quantize", *common, "--stream", "--out", str(tmp_path / "ref")]) == 0
    state = tmp_path / "state"
    out = tmp_path / "out"
    real_save = CalibrationState.save

    def save_then_crash(self, next_block, inputs, rows):
        real_save(self, next_block, inputs, rows)
        if next_block == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(CalibrationState, "save", save_then_crash)
    assert main(["quantize", *common, "--save-state", str(state), "--out", str(out)]) == 130
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if (p / INDEX_FILE).exists()
                and p.name not in ("ref",)]
    assert CalibrationState(state).next_block == 2
    monkeypatch.setattr(CalibrationState, "save", real_save)
    assert main(["quantize", *common, "--save-state", str(state), "--out", str(out)]) == 0
    got, _ = _tensors(out)
    want, _ = _tensors(tmp_path / "ref")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    record = json.loads((out / "babai_run.json").read_text())
    assert record["stream"]["resumed_from_block"] == 2
    assert record["avg_bits_per_weight"] > 4
    assert not state.exists()


@pytest.mark.parametrize("extra, problem", [
    (["--stream", "--mode", "rtn"], "use --mode sequential or observe"),
    (["--save-state", "OUT"], "--save-state must differ from --out"),
])
def test_cli_stream_argument_checks(tmp_path, capsys, extra, problem):
    from babai_ao.cli import main

    out = tmp_path / "o"
    extra = [str(out) if e == "OUT" else e for e in extra]
    assert main(["quantize", "smollm2", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert problem in err and err.count("\n") == 1


def test_shared_inputs_keep_one_copy_of_equal_tensors():
    from babai_ao.calibration.streaming import shared_inputs

    cos, sin = torch.rand(2, 5, 4), torch.rand(2, 5, 4)
    hidden = [torch.rand(2, 5, 8) for _ in range(3)]
    inputs = [(hidden[0], (), {"position_embeddings": (cos, sin), "attention_mask": None}),
              (hidden[1], (), {"position_embeddings": (cos.clone(), sin.clone()),
                               "attention_mask": None}),
              (hidden[2], (), {"position_embeddings": (cos[:1].clone(), sin + 1),
                               "attention_mask": None})]
    out = shared_inputs(inputs)
    assert [o[0] for o in out] == hidden  # hidden states untouched
    assert out[1][2]["position_embeddings"][0] is cos and out[1][2]["position_embeddings"][1] is sin
    other = out[2][2]["position_embeddings"]  # other shape / other values: its own tensors
    assert other[0] is inputs[2][2]["position_embeddings"][0]
    assert other[1] is inputs[2][2]["position_embeddings"][1]
