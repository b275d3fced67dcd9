"""compressed-tensors "pack-quantized" export: our codes, scales and zeros bit for bit.

Checked with compressed-tensors' own code (its int32 unpacking, its pack-quantized
decompressor, its config schema) and with transformers' loader, on a tiny random Llama and
on SmolLM2 cut to 2 blocks; formats it cannot hold fail with one line before writing.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

# babai_ao before transformers' modeling_utils: imported first from the repository root,
# modeling_utils imports `kernels`, whose root-folder shim imports babai_ao while
# modeling_utils is half-initialised (babai_ao's save_pretrained hook then fails).
import babai_ao

# isort: split
from compressed_tensors.compressors.pack_quantized import (
    PackedQuantizationCompressor,
    pack_to_int32,
    unpack_from_int32,
)
from compressed_tensors.quantization import QuantizationConfig
from safetensors.torch import load_file
from torch import nn
from torchao.quantization import quantize_
from transformers import (
    AutoModelForCausalLM,
    CompressedTensorsConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

from babai_ao import BabaiError
from babai_ao.ao.tensor import BabaiQuantizedTensor
from babai_ao.checkpoints.compressed_tensors import (
    pack_int32,
    read_quantization_config,
    save_compressed_tensors,
    to_signed,
)

pytestmark = pytest.mark.usefixtures("exact_cpu_kernel")  # exact references

IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))


def tiny_llama(tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)).eval()


def is_block_linear(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and fqn.startswith("model.layers.")


def quantized_linears(model: nn.Module) -> dict[str, BabaiQuantizedTensor]:
    return {name: m.weight for name, m in model.named_modules()
            if isinstance(getattr(m, "weight", None), BabaiQuantizedTensor)}


@pytest.fixture(scope="module", params=[True, False], ids=["symmetric", "asymmetric"])
def saved(request, tmp_path_factory):
    """``(model, directory, symmetric)``: the tiny Llama, Babai-quantized (4 bit, g32,
    calibrated on random tokens), written as compressed-tensors."""
    symmetric = request.param
    model = tiny_llama()
    babai_ao.quantize_model(model, babai_ao.babai_config(bits=4, group_size=32,
                                                         symmetric=symmetric), IDS,
                            progress=False)
    out = tmp_path_factory.mktemp("ct") / "model"
    save_compressed_tensors(model, out)
    return model, out, symmetric


def load_dequantized(path, dequantize: bool = True) -> nn.Module:
    with warnings.catch_warnings():  # "the config.json's quantization_config will be used"
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        return AutoModelForCausalLM.from_pretrained(
            path, quantization_config=CompressedTensorsConfig(dequantize=dequantize)).eval()


# ---- the mapping --------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(3, 64), (5, 37), (33, 8)])
def test_pack_int32_matches_compressed_tensors(bits, shape):
    """Our int32 packing of codes q = theirs of the signed values q − 2^(b−1), along either
    dimension (K not a multiple of the word: padding as theirs)."""
    codes = torch.randint(0, 2**bits, shape, generator=torch.Generator().manual_seed(bits))
    ours = pack_int32(codes, bits)
    assert ours.dtype == torch.int32
    assert torch.equal(ours, pack_to_int32(to_signed(codes, bits), bits))
    assert torch.equal(pack_int32(codes.t(), bits).t(),
                       pack_to_int32(to_signed(codes, bits), bits, packed_dim=0))
    back = unpack_from_int32(ours, bits, torch.Size(shape))
    assert torch.equal(back.long() + 2 ** (bits - 1), codes)


def test_files_hold_our_codes_and_zeros(saved):
    """weight_packed unpacks (their code) to q − 2^(b−1), the zero point to z − 2^(b−1);
    scales are ours; symmetric files carry no zero point."""
    model, path, symmetric = saved
    tensors = load_file(path / "model.safetensors")
    layers = quantized_linears(model)
    assert len(layers) == 14
    for name, w in layers.items():
        n, k = w.shape
        assert tensors[f"{name}.weight_shape"].tolist() == [n, k]
        values = unpack_from_int32(tensors[f"{name}.weight_packed"], 4, torch.Size([n, k]))
        assert torch.equal(values.long(), w.codes() - 8)
        assert torch.equal(tensors[f"{name}.weight_scale"], w.scale.float())
        if symmetric:
            assert f"{name}.weight_zero_point" not in tensors
            assert bool((w.zero_points() == 8).all())
        else:
            g = w.scale.shape[1]
            zp = unpack_from_int32(tensors[f"{name}.weight_zero_point"], 4,
                                   torch.Size([n, g]), packed_dim=0)
            assert torch.equal(zp.long(), w.zero_points() - 8)
    assert "lm_head.weight" in tensors and torch.equal(tensors["lm_head.weight"],
                                                      model.lm_head.weight)


def test_config_is_compressed_tensors_schema(saved):
    _, path, symmetric = saved
    qc = read_quantization_config(path)
    parsed = QuantizationConfig.model_validate(qc)
    assert parsed.format == "pack-quantized" and parsed.quantization_status == "compressed"
    assert parsed.ignore == ["lm_head"]
    (group,) = parsed.config_groups.values()
    assert group.targets == ["Linear"]
    w = group.weights
    assert (w.num_bits, w.type, w.strategy, w.group_size, w.symmetric, w.actorder) == (
        4, "int", "group", 32, symmetric, None)


# ---- (a) compressed-tensors' own decompression ---------------------------------------------
def test_decompress_with_compressed_tensors_is_exact(saved):
    """Their pack-quantized decompressor gives our dequantized weight exactly (scales written
    in float32, the model's dtype); with float16 scales it rounds (q − z)·s once to float16,
    which is our exact float32 weight rounded to float16."""
    model, path, _ = saved
    tensors = load_file(path / "model.safetensors")
    (scheme,) = QuantizationConfig.model_validate(
        read_quantization_config(path)).config_groups.values()
    for name, w in quantized_linears(model).items():
        state = {k.removeprefix(f"{name}."): v for k, v in tensors.items()
                 if k.startswith(f"{name}.weight_")}
        ours = w.dequantize(torch.float32)
        assert torch.equal(PackedQuantizationCompressor.decompress(state, scheme)["weight"], ours)
        state["weight_scale"] = state["weight_scale"].half()
        half = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
        assert half.dtype == torch.float16 and torch.equal(half, ours.half())


# ---- (b) transformers' loader ---------------------------------------------------------------
def test_transformers_loads_same_weights_and_logits(saved):
    """from_pretrained(dir) (dequantize=True: decompressed while loading) holds our weights
    exactly and gives our logits; symmetric files also load on transformers' default path
    (kept compressed, decompressed at the first forward)."""
    model, path, symmetric = saved
    with torch.no_grad():
        expected = model(IDS).logits
    paths = [True, False] if symmetric else [True]
    for dequantize in paths:
        loaded = load_dequantized(path, dequantize)
        with torch.no_grad():
            logits = loaded(IDS).logits
        for name, w in quantized_linears(model).items():
            assert torch.equal(loaded.get_submodule(name).weight, w.dequantize()), name
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


# ---- (d) what the format cannot hold ---------------------------------------------------------
def _quantize(kind: str) -> nn.Module:
    model = tiny_llama(tie=kind == "embedding")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantize_ without calibration: RTN
        if kind in ("2bit", "3bit"):
            quantize_(model, babai_ao.babai_config(bits=int(kind[0]), group_size=32),
                      filter_fn=is_block_linear)
        elif kind == "ssqr":
            quantize_(model, babai_ao.babai_config(bits=4, group_size=32, clip="ssqr",
                                                   outlier_density=0.02),
                      filter_fn=is_block_linear)
        elif kind == "hptq":
            quantize_(model, babai_ao.babai_config(clip="hptq", target_bits=3.3),
                      filter_fn=is_block_linear)
        elif kind == "embedding":
            quantize_(model, babai_ao.babai_config(bits=4, group_size=32),
                      filter_fn=is_block_linear)
            babai_ao.quantize_embeddings_(model, bits=4, group_size=32)
    return model


@pytest.mark.parametrize("kind, needle", [
    ("2bit", "2-bit"), ("3bit", "3-bit"), ("ssqr", "SSQR"), ("hptq", "HPTQ"),
    ("embedding", "Embedding"), ("float", "no babai-ao quantized linears")])
def test_unrepresentable_is_one_line_error_and_writes_nothing(tmp_path, kind, needle):
    model = _quantize(kind)
    with pytest.raises(BabaiError) as e:
        save_compressed_tensors(model, tmp_path / "out")
    msg = str(e.value)
    assert needle in msg and "\n" not in msg
    if kind != "float":
        assert "4- or 8-bit" in msg  # names what works
    assert not (tmp_path / "out").exists()


def test_not_a_transformers_model(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = nn.Sequential(nn.Linear(64, 32))
        quantize_(model, babai_ao.babai_config(bits=4, group_size=32))
    with pytest.raises(BabaiError, match="not a transformers model"):
        save_compressed_tensors(model, tmp_path / "out")


def test_8bit_and_per_row_groups_and_tied_lm_head(tmp_path):
    """8 bit, one group per row (strategy channel), tied lm_head stored once: loads exact."""
    model = tiny_llama(tie=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, babai_ao.babai_config(bits=8, group_size=None),
                  filter_fn=is_block_linear)
    save_compressed_tensors(model, tmp_path / "m")
    qc = read_quantization_config(tmp_path / "m")
    (group,) = qc["config_groups"].values()
    assert (group["weights"]["num_bits"], group["weights"]["strategy"]) == (8, "channel")
    assert "lm_head.weight" not in load_file(tmp_path / "m" / "model.safetensors")
    loaded = load_dequantized(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)


# ---- (c) SmolLM2, 2 blocks --------------------------------------------------------------------
@pytest.mark.model
def test_smollm2_loads_in_transformers_with_same_logits(smollm2_small, calibration_small,
                                                        tmp_path):
    """Babai w4 g64 asymmetric (the P1 grid) on SmolLM2's first 2 blocks, written with the
    tokenizer; transformers loads the directory with our weights exactly and our logits."""
    model, tokenizer = smollm2_small
    model = copy.deepcopy(model)
    babai_ao.quantize_model(model, babai_ao.babai_config(bits=4, group_size=64),
                            calibration_small[:2, :64], progress=False)
    save_compressed_tensors(model, tmp_path / "smol", tokenizer)
    config = json.loads((tmp_path / "smol" / "config.json").read_text())
    assert config["quantization_config"]["ignore"] == ["lm_head"]
    assert config["num_hidden_layers"] == 2 and config["tie_word_embeddings"]
    assert (tmp_path / "smol" / "tokenizer.json").is_file()
    loaded = load_dequantized(tmp_path / "smol")
    ids = calibration_small[2:3, :48]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    for name, w in quantized_linears(model).items():
        assert torch.equal(loaded.get_submodule(name).weight, w.dequantize()), name


# ---- the command line ---------------------------------------------------------------------------
def _fake_run(tmp_path, bits: int, clip: str = "true"):
    """A directory that preflight reads as a `babai-ao quantize` run (config + record only)."""
    run = tmp_path / f"run{bits}{clip}"
    run.mkdir()
    tiny_llama().config.save_pretrained(run)
    (run / "babai_run.json").write_text(json.dumps({"bits": bits, "clip": clip}))
    return run


@pytest.mark.parametrize("case, needle", [
    ("3bit", "3-bit"), ("ssqr", "clip=ssqr"), ("suffix", "names a file"),
    ("exists", "already exists"), ("embedding", "--quantize-embedding"),
    ("float", "not a `babai-ao quantize` directory")])
def test_cli_refuses_before_any_work(capsys, tmp_path, case, needle):
    from babai_ao import cli

    run = _fake_run(tmp_path, 3 if case == "3bit" else 4, "ssqr" if case == "ssqr" else "true")
    model = str(tmp_path / "float") if case == "float" else str(run)
    if case == "float":
        tiny_llama().config.save_pretrained(model)
    out = tmp_path / ("m.onnx" if case == "suffix" else "ct")
    if case == "exists":
        out.mkdir()
    extra = ["--quantize-embedding", "4"] if case == "embedding" else []
    code = cli.main(["export", model, "--format", "compressed-tensors", "--out", str(out),
                     *extra])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("babai-ao")]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert case == "exists" or not out.exists()


@pytest.mark.model
def test_cli_export_compressed_tensors(capsys, tmp_path):
    """quantize (SmolLM2, 2 blocks) then export: a directory transformers loads, same logits."""
    from babai_ao import cli

    run = tmp_path / "run"
    assert cli.main(["quantize", "smollm2", "--num-layers", "2", "--bits", "4", "--group-size",
                     "64", "--calib-windows", "2", "--calib-len", "64", "--out", str(run),
                     "--no-progress"]) == 0
    out = tmp_path / "ct"
    code = cli.main(["export", str(run), "--format", "compressed-tensors", "--out", str(out),
                     "--seq-len", "8", "--no-progress"])
    text, err = capsys.readouterr()
    assert code == 0, err
    assert "Loading weights" not in err and "it/s]" not in err, err  # --no-progress
    assert "4-bit group 64 asymmetric" in text, text
    diff = float(text.split("max|diff| vs eager ")[1].split()[0])
    assert diff < 1e-4
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
