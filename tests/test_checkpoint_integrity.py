"""Damaged checkpoint bytes fail to load (``babai_ao.ao.integrity``), intact ones load bit-exactly.

A tiny random Llama is quantized three ways (plain 4-bit, SSQR with CSR outliers, HPTQ's
Huffman stream) and saved through ``babai_ao.checkpoints.hf`` (safetensors) and ``torch.save``.
Then one byte inside one stored tensor's data is flipped — for every kind of stored tensor
(codes, scales, zeros, outlier pointers/columns/values, bitstream, codebook, chunk index,
header) — and loading must raise ``BabaiError`` saying the bytes are damaged, where before
the model loaded and ran with wrong weights. Checkpoints without a digest still load, with
structural checks of their values.
"""

from __future__ import annotations

import json
import shutil
import struct
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torchao.quantization import quantize_
from transformers import LlamaConfig, LlamaForCausalLM

from babai_ao import BabaiError
from babai_ao.ao import integrity
from babai_ao.ao.config import babai_config
from babai_ao.ao.hptq_tensor import HuffmanQuantizedTensor
from babai_ao.ao.tensor import BabaiQuantizedTensor
from babai_ao.checkpoints import hf

QUANTIZED = (BabaiQuantizedTensor, HuffmanQuantizedTensor)
IDS = torch.tensor([[1, 5, 42, 7, 99, 3, 64, 17]])
CONFIGS = {
    "plain": babai_config(bits=4, group_size=32),
    "ssqr": babai_config(bits=3, group_size=32, clip="ssqr", outlier_density=0.02),
    "hptq": babai_config(clip="hptq", target_bits=3.3),
}
# the stored data tensors of each format (the suffix of "<module>._weight_<suffix>")
SUFFIXES = {
    "plain": ("qdata", "scale", "zero_point"),
    "ssqr": ("qdata", "scale", "zero_point", "outlier_ptr", "outlier_idx", "outlier_val"),
    "hptq": ("bitstream", "symbols", "lengths", "offsets", "header", "scale"),
}
DAMAGE = "bytes are damaged"


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def is_block_linear(m: torch.nn.Module, fqn: str) -> bool:
    return isinstance(m, torch.nn.Linear) and fqn.startswith("model.layers.")


def quantized_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.weight": m.weight.detach() for n, m in model.named_modules()
            if isinstance(getattr(m, "weight", None), QUANTIZED)}


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert type(a) is type(b) and tuple(a.shape) == tuple(b.shape) and a.dtype == b.dtype
    for name in integrity.data_names(type(a)):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), name
    assert a.certificate_json == b.certificate_json


@pytest.fixture(scope="module", params=list(CONFIGS))
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """``(kind, model, safetensors dir, torch.save file)`` of a quantized tiny Llama."""
    kind = request.param
    model = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no Hessian: round to nearest
        quantize_(model, CONFIGS[kind], filter_fn=is_block_linear)
    assert len(quantized_weights(model)) == 14
    root = tmp_path_factory.mktemp(f"integrity-{kind}")
    hf.save_pretrained(model, root / "hf", CONFIGS[kind])
    torch.save(model.state_dict(), root / "sd.pt")
    return kind, model, root / "hf", root / "sd.pt"


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def safetensors_layout(path: Path) -> tuple[int, dict]:
    """(start of the data section, header) of a safetensors file."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return 8 + n, json.loads(data[8:8 + n])


def flip_safetensors_byte(path: Path, key: str) -> None:
    """Flip every bit of one byte in the middle of tensor ``key``'s stored data."""
    start, header = safetensors_layout(path)
    lo, hi = header[key]["data_offsets"]
    assert hi > lo, key
    data = bytearray(path.read_bytes())
    data[start + (lo + hi) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def flip_torch_save_bytes(path: Path, t: torch.Tensor) -> int:
    """Flip one byte in the middle of tensor ``t``'s bytes in the ``torch.save`` zip ``path``,
    in every stored record with exactly ``t``'s storage bytes (equal small tensors of other
    layers, e.g. Huffman headers, are stored apart). Returns how many were flipped."""
    want = bytes(t.untyped_storage())
    at = t.storage_offset() * t.element_size() + t.numel() * t.element_size() // 2
    raw = bytearray(path.read_bytes())
    flipped = 0
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if "/data/" in info.filename and info.file_size == len(want) \
                    and z.read(info) == want:
                name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:
                                                               info.header_offset + 30])
                raw[info.header_offset + 30 + name_len + extra_len + at] ^= 0xFF
                flipped += 1
    path.write_bytes(bytes(raw))
    return flipped


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


# ---- safetensors (save_pretrained / from_pretrained) ----------------------------------

def test_intact_safetensors_load_bit_exactly_with_digests(saved) -> None:
    kind, model, path, _ = saved
    (file,) = path.glob("*.safetensors")
    with safe_open(file, framework="pt") as h:
        meta = h.metadata()
    want = quantized_weights(model)
    for name, w in want.items():  # every quantized tensor carries its digest
        assert json.loads(meta[name])["_data"]["digest"] == integrity.digest_of(w)
    assert hf.verify_checkpoint(path) == len(want)
    loaded = hf.from_pretrained(path)
    got = quantized_weights(loaded)
    assert set(got) == set(want)
    for name in want:
        assert_same(got[name], want[name])
    assert torch.equal(logits(loaded), logits(model))


@pytest.mark.parametrize("layer", ["model.layers.0.self_attn.q_proj",
                                   "model.layers.1.mlp.down_proj"])
def test_a_flipped_byte_in_any_stored_tensor_fails_from_pretrained(saved, layer: str,
                                                                  tmp_path: Path) -> None:
    kind, _, path, _ = saved
    for suffix in SUFFIXES[kind]:
        target = _layer_with_outliers(path) if suffix.startswith("outlier") else layer
        damaged = copy_checkpoint(path, tmp_path / suffix)
        (file,) = damaged.glob("*.safetensors")
        flip_safetensors_byte(file, f"{target}._weight_{suffix}")
        with pytest.raises(BabaiError, match=DAMAGE) as err:
            hf.from_pretrained(damaged)
        message = str(err.value)
        assert f"{target}.weight" in message and "\n" not in message, (suffix, message)
        with pytest.raises(BabaiError, match=DAMAGE):
            hf.verify_checkpoint(damaged)


def _layer_with_outliers(path: Path) -> str:
    (file,) = path.glob("*.safetensors")
    with safe_open(file, framework="pt") as h:
        for key in h.keys():  # noqa: SIM118
            if key.endswith("._weight_outlier_idx") and h.get_slice(key).get_shape()[0] > 2:
                return key.removesuffix("._weight_outlier_idx")
    raise AssertionError("no SSQR layer stored outliers")


def test_plain_transformers_load_checks_the_digest(saved, tmp_path: Path) -> None:
    """``AutoModelForCausalLM.from_pretrained`` (babai-ao registered) refuses a damaged tensor
    instead of returning a model that runs."""
    from transformers import AutoModelForCausalLM

    kind, _, path, _ = saved
    damaged = copy_checkpoint(path, tmp_path / "ckpt")
    (file,) = damaged.glob("*.safetensors")
    flip_safetensors_byte(file, f"model.layers.0.mlp.up_proj._weight_{SUFFIXES[kind][0]}")
    with pytest.raises(RuntimeError, match="conversion"):
        AutoModelForCausalLM.from_pretrained(damaged)


def without_digests(path: Path, damage: tuple[str, str, float] | None = None) -> None:
    """Rewrite ``path``'s checkpoint as written before digests (metadata entries without one),
    optionally setting element 0 of tensor ``damage[0]``'s ``damage[1]`` to ``damage[2]``."""
    (file,) = path.glob("*.safetensors")
    with safe_open(file, framework="pt") as h:
        meta = dict(h.metadata())
        tensors = {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118
    for name in json.loads(meta["tensor_names"]):
        entry = json.loads(meta[name])
        if entry.get("_data", {}).pop("digest", None) is not None:
            meta[name] = json.dumps(entry)
    if damage is not None:
        key = f"{damage[0]}._weight_{damage[1]}"
        tensors[key] = tensors[key].clone()
        tensors[key].reshape(-1)[0] = damage[2]
    save_file(tensors, file, metadata=meta)


def test_checkpoints_without_digests_load_and_are_checked_structurally(saved,
                                                                       tmp_path: Path) -> None:
    kind, model, path, _ = saved
    old = copy_checkpoint(path, tmp_path / "old")
    without_digests(old)
    loaded = hf.from_pretrained(old)
    assert torch.equal(logits(loaded), logits(model))
    layer = _layer_with_outliers(path) if kind == "ssqr" else "model.layers.0.self_attn.o_proj"
    cases = [("scale", float("nan")), ("scale", -1.0)]
    if kind == "ssqr":
        cases += [("outlier_ptr", 5), ("outlier_idx", 30000)]
    if kind == "hptq":
        cases += [("offsets", 3), ("lengths", 31)]
    for suffix, value in cases:
        bad = copy_checkpoint(path, tmp_path / f"{suffix}{value}")
        without_digests(bad, (layer, suffix, value))
        with pytest.raises(BabaiError, match=f"{layer}.weight .*no digest.*{DAMAGE}"):
            hf.from_pretrained(bad)


# ---- torch.save (load_state_dict, torch.load) -----------------------------------------

def test_intact_torch_save_loads_bit_exactly(saved) -> None:
    _, model, _, sd = saved
    fresh = hf.load_state_dict(tiny_llama(), sd, assign=True)
    want, got = quantized_weights(model), quantized_weights(fresh)
    assert set(got) == set(want)
    for name in want:
        assert_same(got[name], want[name])
    assert torch.equal(logits(fresh), logits(model))
    state = torch.load(sd, weights_only=True)  # plain torch.load checks too, and keeps no digest
    assert all("digest" not in w.__dict__ for w in quantized_weights(fresh).values())
    assert isinstance(state["model.layers.0.mlp.up_proj.weight"], QUANTIZED)


def test_a_flipped_byte_in_any_stored_tensor_fails_torch_load(saved, tmp_path: Path) -> None:
    kind, model, _, sd = saved
    layer = (_layer_with_outliers(saved[2]) if kind == "ssqr"
             else "model.layers.1.self_attn.v_proj")
    w = quantized_weights(model)[f"{layer}.weight"]
    for suffix in SUFFIXES[kind]:
        damaged = tmp_path / f"{suffix}.pt"
        shutil.copy(sd, damaged)
        assert flip_torch_save_bytes(damaged, getattr(w, suffix)) >= 1
        with pytest.raises(BabaiError, match=rf"model\.layers\.\d\.\S+\.weight in .*{DAMAGE}"):
            hf.load_state_dict(tiny_llama(), damaged, assign=True)
        with pytest.raises(BabaiError, match=DAMAGE):  # no key to name, still refused
            torch.load(damaged, weights_only=True)


def test_old_pickles_without_digests_load() -> None:
    """A pickled state without a digest (written before it existed) is checked structurally."""
    model = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, CONFIGS["plain"], filter_fn=is_block_linear)
    w = model.model.layers[0].mlp.up_proj.weight.detach()
    state = dict(w.__dict__)  # what __getstate__ gave before digests
    for scale, ok in ((w.scale, True), (torch.full_like(w.scale, float("inf")), False)):
        copy = BabaiQuantizedTensor.__new__(BabaiQuantizedTensor, w.qdata, w.scale,
                                            w.zero_point, w.bits, w.group_size, w.shape,
                                            w.dtype)
        if ok:
            copy.__setstate__({**state, "scale": scale})
            assert_same(copy, w)
        else:
            with pytest.raises(BabaiError, match="no digest"):
                copy.__setstate__({**state, "scale": scale})


# ---- the digest never travels in memory ---------------------------------------------------

def test_tensor_ops_carry_no_digest_and_resave_cleanly(tmp_path: Path) -> None:
    """Views and copies hash their own bytes at save time: a transformed tensor saves and
    loads without a false alarm, and its digest is deterministic."""
    model = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, CONFIGS["ssqr"], filter_fn=is_block_linear)
    w = model.model.layers[0].mlp.down_proj.weight.detach()
    assert integrity.digest_of(w) == integrity.digest_of(w.clone().detach())
    variants = {"t": w.t(), "bf16": w.to(torch.bfloat16), "rows": w[:32], "clone": w.clone()}
    for name, v in variants.items():
        assert "digest" not in v.__dict__
        torch.save({"w": v}, tmp_path / f"{name}.pt")
        back = torch.load(tmp_path / f"{name}.pt", weights_only=True)["w"]
        assert_same(back, v)
    # a tensor loaded from a checkpoint, changed in place, saves its new bytes' digest
    torch.save({"w": w}, tmp_path / "w.pt")
    loaded = torch.load(tmp_path / "w.pt", weights_only=True)["w"]
    loaded.qdata[0, 0] ^= 0xFF
    torch.save({"w": loaded}, tmp_path / "changed.pt")
    assert torch.equal(torch.load(tmp_path / "changed.pt", weights_only=True)["w"].qdata,
                       loaded.qdata)
