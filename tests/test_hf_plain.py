"""Plain Hugging Face calls on babai-ao models, each side in a fresh process.

After ``import babai_ao`` (nothing else from it): ``model.save_pretrained(dir)`` of a model
quantized by ``quantize_model`` (clipped grid), ``quantize_`` (SSQR, HPTQ) and with a
quantized tied embedding, then ``AutoModelForCausalLM.from_pretrained(dir)`` in another
process gives identical logits, and the loaded model saves and loads again. A model whose
config is unknown stops before writing anything, naming the call that works.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

KINDS = ("sequential", "ssqr", "hptq", "embedding")

SAVE = textwrap.dedent("""
    import sys, warnings, torch
    import babai_ao
    from transformers import LlamaConfig, LlamaForCausalLM
    from torchao.quantization import quantize_

    kind, out = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=kind == "embedding"
    )).eval()
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    block = lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn.startswith("model.layers.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantize_ without calibration: RTN on the grid
        if kind == "sequential":
            babai_ao.quantize_model(model, babai_ao.babai_config(bits=4, group_size=32), ids,
                                    progress=False)
        elif kind == "ssqr":
            quantize_(model, babai_ao.babai_config(bits=3, group_size=32, clip="ssqr",
                                                  outlier_density=0.02), filter_fn=block)
        elif kind == "hptq":
            quantize_(model, babai_ao.babai_config(clip="hptq", target_bits=3.3),
                      filter_fn=block)
        else:
            quantize_(model, babai_ao.babai_config(bits=4, group_size=32), filter_fn=block)
            babai_ao.quantize_embeddings_(model, bits=4, group_size=32)
    model.save_pretrained(out)
    with torch.no_grad():
        torch.save({"ids": ids[:1], "logits": model(ids[:1]).logits}, out + "/expected.pt")
""")

LOAD = textwrap.dedent("""
    import sys, torch
    import babai_ao
    from transformers import AutoModelForCausalLM

    path, again = sys.argv[1], sys.argv[2]
    expected = torch.load(path + "/expected.pt")
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        logits = model(expected["ids"]).logits
    kinds = sorted({type(p).__name__ for p in model.parameters()})
    model.save_pretrained(again)  # loaded from a checkpoint: saves again
    reloaded = AutoModelForCausalLM.from_pretrained(again)
    with torch.no_grad():
        logits_again = reloaded(expected["ids"]).logits
    torch.save({"logits": logits, "again": logits_again, "kinds": kinds,
                "tied": model.lm_head.weight is model.model.embed_tokens.weight},
               path + "/loaded.pt")
""")


def python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("kind", KINDS)
def test_plain_save_pretrained_from_pretrained_round_trip(kind: str, tmp_path: Path) -> None:
    out, again = tmp_path / "saved", tmp_path / "again"
    run = python(SAVE, kind, str(out))
    assert run.returncode == 0, run.stderr[-4000:]
    run = python(LOAD, str(out), str(again))
    assert run.returncode == 0, run.stderr[-4000:]
    expected = torch.load(out / "expected.pt")
    loaded = torch.load(out / "loaded.pt")
    want = "HuffmanQuantizedTensor" if kind == "hptq" else "BabaiQuantizedTensor"
    assert want in loaded["kinds"], loaded["kinds"]
    assert torch.equal(loaded["logits"], expected["logits"])
    assert torch.equal(loaded["again"], expected["logits"])
    if kind == "embedding":
        assert loaded["tied"]


UNKNOWN_CONFIG = textwrap.dedent("""
    import sys, torch, warnings
    import babai_ao
    from babai_ao import BabaiError
    from transformers import LlamaConfig, LlamaForCausalLM
    from torchao.quantization import quantize_

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    donor = LlamaForCausalLM(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(donor, babai_ao.babai_config(bits=4, group_size=32),
                  filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear)
                  and fqn.startswith("model.layers."))
    model = LlamaForCausalLM(cfg)  # quantized weights from a state dict: config unknown
    model.load_state_dict(donor.state_dict(), assign=True)
    try:
        model.save_pretrained(sys.argv[1])
    except BabaiError as e:
        print(e)
    else:
        raise AssertionError("saved without a config")
""")


def test_unknown_config_stops_before_writing(tmp_path: Path) -> None:
    out = tmp_path / "never"
    run = python(UNKNOWN_CONFIG, str(out))
    assert run.returncode == 0, run.stderr[-4000:]
    assert "babai_ao.hf.save_pretrained(model, path, babai_ao.babai_config" in run.stdout
    assert len(run.stdout.strip().splitlines()) == 1
    assert not out.exists()


def test_import_babai_ao_exposes_the_documented_modules() -> None:
    run = python(textwrap.dedent("""
        import sys, babai_ao
        assert "torchao" not in sys.modules and "transformers" not in sys.modules
        assert callable(babai_ao.hf.save_pretrained) and callable(babai_ao.hf.from_pretrained)
        assert callable(babai_ao.export.to_onnx) and callable(babai_ao.cli.main)
        assert babai_ao.checkpoints.hf is babai_ao.hf and callable(babai_ao.passes.install)
    """))
    assert run.returncode == 0, run.stderr[-3000:]
