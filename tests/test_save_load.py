"""Save/load: torch.save(state_dict) and transformers safetensors, bit-exact; bad files fail."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torchao.quantization import quantize_

from babai_ao import BabaiError
from babai_ao.ao.config import babai_config
from babai_ao.ao.tensor import BabaiQuantizedTensor
from babai_ao.checkpoints.hf import load_state_dict

DATA = ("qdata", "scale", "zero_point", "outlier_ptr", "outlier_idx", "outlier_val")


def mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.GELU(),
                               torch.nn.Linear(64, 32)).eval()


def quantized_mlp(**cfg) -> torch.nn.Sequential:
    model = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, babai_config(**cfg))
    return model


def assert_same_weight(a: BabaiQuantizedTensor, b: BabaiQuantizedTensor) -> None:
    assert type(a) is type(b) is BabaiQuantizedTensor
    assert (a.bits, a.group_size, tuple(a.shape), a.dtype) == (b.bits, b.group_size,
                                                               tuple(b.shape), b.dtype)
    for name in DATA:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), name
    assert a.certificate_json == b.certificate_json


CONFIGS = [dict(bits=4, group_size=32), dict(bits=3, group_size=32, symmetric=True),
           dict(bits=3, group_size=32, clip="ssqr", outlier_density=0.02)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["4bit", "3bit-sym", "ssqr"])
def test_state_dict_round_trip_is_bit_exact(cfg: dict, tmp_path: Path) -> None:
    model = quantized_mlp(**cfg)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    sd = torch.load(tmp_path / "sd.pt", weights_only=True)
    x = torch.randn(5, 128)
    fresh = mlp()  # a float model: the quantized tensors replace its weights
    fresh.load_state_dict(sd, assign=True)
    same = quantized_mlp(**cfg)  # a model quantized the same way: copied in place
    same[0].weight.qdata.zero_()
    same.load_state_dict(sd)
    for loaded in (fresh, same):
        for i in (0, 2):
            assert_same_weight(loaded[i].weight, model[i].weight)
        assert torch.equal(loaded(x), model(x))
    if cfg.get("clip") == "ssqr":
        assert model[0].weight.outlier_idx.numel() > 0


def test_mismatched_state_dicts_raise(tmp_path: Path) -> None:
    sd = quantized_mlp(bits=4, group_size=32).state_dict()
    torch.save(sd, tmp_path / "sd.pt")
    model = load_state_dict(mlp(), tmp_path / "sd.pt", assign=True)
    assert_same_weight(model[0].weight, sd["0.weight"])
    with pytest.raises(BabaiError, match="bits=4 does not match"):
        load_state_dict(quantized_mlp(bits=3, group_size=32), sd)
    with pytest.raises(BabaiError, match="assign=True"):
        load_state_dict(mlp(), sd)
    with pytest.raises(BabaiError, match="outlier"):  # SSQR outlier counts differ per model
        load_state_dict(quantized_mlp(bits=4, group_size=32, clip="ssqr", outlier_density=0.02),
                        quantized_mlp(bits=4, group_size=32, clip="ssqr",
                                      outlier_density=0.05).state_dict())
    with pytest.raises(BabaiError, match="size mismatch"):
        load_state_dict(torch.nn.Sequential(torch.nn.Linear(128, 48), torch.nn.GELU(),
                                            torch.nn.Linear(48, 32)), sd, assign=True)
    data = (tmp_path / "sd.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(BabaiError, match="truncated"):
        load_state_dict(mlp(), tmp_path / "cut.pt", assign=True)


# ---- transformers (safetensors), real model -------------------------------------------

FRESH_LOAD = textwrap.dedent(f"""
    import json, sys, torch
    torch.set_num_threads(1)
    import babai_ao.ao.config  # registers babai-ao with torchao's and transformers' allow-lists
    from transformers import AutoModelForCausalLM
    path = sys.argv[1]
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "mismatched_keys", "error_msgs",
                                         "unexpected_keys")), info
    ids = torch.load(path + "/ids.pt")
    out = {{"logits": model(ids).logits}}
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if type(w).__name__ == "BabaiQuantizedTensor":
            out[name] = {{k: getattr(w, k) for k in {DATA!r} if getattr(w, k) is not None}}
            out[name + ".cert"] = w.certificate_json
    torch.save(out, path + "/fresh.pt")
    print(type(model.config.quantization_config.quant_type).__name__)
""")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory):
    """SmolLM2 (one block) saved by babai_ao.checkpoints.hf: k/v projections in SSQR form (with CSR
    outliers), the other linears plain 4-bit (the SSQR rate search is kept to small layers)."""
    from babai_ao.calibration.models import load_smollm2
    from babai_ao.checkpoints import hf

    model, _ = load_smollm2(num_layers=1)
    cfg = babai_config(bits=4, group_size=64)
    ssqr = babai_config(bits=4, group_size=64, clip="ssqr", outlier_density=0.005)

    def kv(m: torch.nn.Module, fqn: str) -> bool:
        return isinstance(m, torch.nn.Linear) and fqn.endswith(("k_proj", "v_proj"))

    def rest(m: torch.nn.Module, fqn: str) -> bool:
        return isinstance(m, torch.nn.Linear) and fqn.startswith("model.layers.") \
            and not kv(m, fqn)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, ssqr, filter_fn=kv)
        quantize_(model, cfg, filter_fn=rest)
    path = tmp_path_factory.mktemp("smollm2-babai")
    hf.save_pretrained(model, path, cfg)
    torch.save(torch.tensor([[1, 42, 314, 2718, 99]]), path / "ids.pt")
    return model, path


@pytest.mark.model
def test_save_pretrained_from_pretrained_fresh_process(saved) -> None:
    model, path = saved
    run = subprocess.run([sys.executable, "-c", FRESH_LOAD, str(path)], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.strip().endswith("BabaiConfig")
    fresh = torch.load(path / "fresh.pt", weights_only=True)
    quantized = {n: m.weight for n, m in model.named_modules()
                 if isinstance(getattr(m, "weight", None), BabaiQuantizedTensor)}
    assert len(quantized) == 7 and set(quantized) <= set(fresh)
    for name, w in quantized.items():
        for k in DATA:
            if getattr(w, k) is None:
                assert k not in fresh[name]
            else:
                assert torch.equal(fresh[name][k], getattr(w, k)), (name, k)
        assert fresh[name + ".cert"] == w.certificate_json
    assert any(w.outlier_idx is not None for w in quantized.values())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same reduction order as the fresh process
    try:
        with torch.no_grad():
            logits = model(torch.load(path / "ids.pt")).logits
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(fresh["logits"], logits)


@pytest.mark.model
def test_corrupt_transformers_checkpoints_raise(saved, tmp_path: Path) -> None:
    from babai_ao.checkpoints import hf

    _, path = saved
    files = list(Path(path).glob("*.safetensors"))
    for f in Path(path).iterdir():
        if f.suffix != ".safetensors" and f.is_file():
            (tmp_path / f.name).write_bytes(f.read_bytes())
    data = files[0].read_bytes()
    (tmp_path / files[0].name).write_bytes(data[: len(data) // 2])
    with pytest.raises(BabaiError, match="truncated or corrupt"):
        hf.from_pretrained(tmp_path)
    # metadata that disagrees with the stored tensors: 4-bit codes declared 3-bit
    with safe_open(files[0], framework="pt") as h:
        meta = h.metadata()
        tensors = {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118
    key = "model.layers.0.mlp.down_proj.weight"
    entry = json.loads(meta[key])
    entry["_data"]["bits"] = 3
    meta[key] = json.dumps(entry)
    save_file(tensors, tmp_path / files[0].name, metadata=meta)
    with pytest.raises(BabaiError, match="does not match its metadata"):
        hf.from_pretrained(tmp_path)


HPTQ_FRESH_LOAD = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from babai_ao.checkpoints import hf
    from babai_ao.ao.hptq_tensor import decode_model
    path = sys.argv[1]
    model = hf.from_pretrained(path)
    streams = {n: m.weight.nbytes_stored for n, m in model.named_modules()
               if type(getattr(m, "weight", None)).__name__ == "HuffmanQuantizedTensor"}
    decoded = decode_model(model)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 42, 314, 2718, 99]])).logits
    torch.save({"logits": logits, "streams": streams, "decoded": decoded}, path + "/fresh.pt")
""")


@pytest.mark.model
def test_hptq_save_pretrained_from_pretrained_fresh_process(tmp_path: Path) -> None:
    """HPTQ (Huffman stream in safetensors) through transformers, loaded in a fresh process:
    the stream survives byte for byte and decodes to the same outputs."""
    from babai_ao.ao.hptq_tensor import HuffmanQuantizedTensor, decode_model
    from babai_ao.calibration.models import load_smollm2
    from babai_ao.checkpoints import hf

    model, _ = load_smollm2(num_layers=1)
    cfg = babai_config(clip="hptq", target_bits=3.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no Hessian: HRTN
        quantize_(model, cfg, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear)
                  and fqn.startswith("model.layers."))
    streams = {n: m.weight.nbytes_stored for n, m in model.named_modules()
               if isinstance(getattr(m, "weight", None), HuffmanQuantizedTensor)}
    assert len(streams) == 7
    hf.save_pretrained(model, tmp_path, cfg)
    run = subprocess.run([sys.executable, "-c", HPTQ_FRESH_LOAD, str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    fresh = torch.load(tmp_path / "fresh.pt", weights_only=True)
    assert fresh["streams"] == streams and fresh["decoded"] == 7
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ids = torch.tensor([[1, 42, 314, 2718, 99]])
    try:
        with torch.no_grad():
            from babai_ao.kernels import cpu_int4

            with cpu_int4.exact_forwards():  # the CPU default would round x to bf16
                stored = model(ids).logits  # babai::hptq_linear on the stream
            decode_model(model)
            logits = model(ids).logits  # the decoded 8-bit form, as in the fresh process
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(fresh["logits"], logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(stored, logits, rtol=0, atol=1e-3)


EMBEDDING_FRESH_LOAD = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from babai_ao.checkpoints import hf
    path = sys.argv[1]
    model = hf.from_pretrained(path)
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    with torch.no_grad():
        logits = model(torch.tensor([[1, 42, 314, 2718, 99]])).logits
    torch.save({"logits": logits, "emb": type(emb).__name__, "tied": head is emb,
                "qdata": emb.qdata}, path + "/fresh.pt")
""")


@pytest.mark.model
def test_quantized_embedding_save_pretrained_fresh_process(tmp_path: Path) -> None:
    """4-bit tied embedding/lm_head + 4-bit linears through transformers, fresh process: the
    table comes back quantized, still tied to lm_head, stored once, same logits."""
    from babai_ao import quantize_embeddings_
    from babai_ao.calibration.models import load_smollm2
    from babai_ao.checkpoints import hf

    model, _ = load_smollm2(num_layers=1)
    cfg = babai_config(bits=4, group_size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no Hessian: RTN
        quantize_(model, cfg, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear)
                  and fqn.startswith("model.layers."))
    quantize_embeddings_(model, bits=4, group_size=64)
    emb = model.model.embed_tokens.weight
    assert isinstance(emb, BabaiQuantizedTensor) and model.lm_head.weight is emb
    hf.save_pretrained(model, tmp_path, cfg)
    files = list(tmp_path.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    assert size < 1.2 * emb.nbytes_stored + 8 * 2**20, size  # not a float table, stored once
    run = subprocess.run([sys.executable, "-c", EMBEDDING_FRESH_LOAD, str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    fresh = torch.load(tmp_path / "fresh.pt", weights_only=True)
    assert fresh["emb"] == "BabaiQuantizedTensor" and fresh["tied"]
    assert torch.equal(fresh["qdata"], emb.qdata)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            logits = model(torch.tensor([[1, 42, 314, 2718, 99]])).logits
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(fresh["logits"], logits)
