"""Checkpoints written before ``babai_ao/`` was grouped into subpackages still load.

``tests/fixtures/pre_layout`` was written by the flat-layout code (``make.py`` there says
how): transformers checkpoints whose ``config.json`` names ``BabaiConfig`` (found through
torchao's module allow-list) and ``torch.save`` pickles that name ``babai_ao.ao.tensor`` and
``babai_ao.ao.hptq_tensor``. Each is loaded in a fresh process, as a user would, and must give
the outputs the model gave before it was saved.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "pre_layout"

LOAD = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from babai_ao import hf
    fixture, out = sys.argv[1], sys.argv[2]
    ids = torch.load(fixture + "/expected.pt", weights_only=True)["ids"]
    result = {}
    for name in ("llama_ssqr", "llama_hptq"):
        model = hf.from_pretrained(fixture + "/" + name)
        result[name + "_types"] = sorted({type(p).__name__ for p in model.parameters()})
        with torch.no_grad():
            result[name] = model(ids).logits

    def mlp():
        return torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.GELU(),
                                   torch.nn.Linear(64, 32)).eval()

    x = torch.load(fixture + "/expected.pt", weights_only=True)["x"]
    states = torch.load(fixture + "/state_dicts.pt", weights_only=True)  # allow-listed names
    for name, state in states.items():
        net = hf.load_state_dict(mlp(), state, assign=True)
        result["mlp_" + name + "_type"] = type(net[0].weight).__module__
        with torch.no_grad():
            result["mlp_" + name] = net(x)
    pickled = torch.load(fixture + "/state_dicts.pt", weights_only=False)  # plain pickle
    assert type(pickled["babai"]["0.weight"]) is type(states["babai"]["0.weight"])
    torch.save(result, out)
""")


def test_pre_layout_checkpoints_load_with_the_same_outputs(tmp_path: Path) -> None:
    out = tmp_path / "loaded.pt"
    env = {**os.environ, "BABAI_CPU_KERNEL": "exact"}  # the outputs saved were exact fp32
    run = subprocess.run([sys.executable, "-c", LOAD, str(FIXTURE), str(out)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    got = torch.load(out, weights_only=True)
    want = torch.load(FIXTURE / "expected.pt", weights_only=True)
    assert got["llama_ssqr_types"] == ["BabaiQuantizedTensor", "Parameter"]
    assert got["llama_hptq_types"] == ["HuffmanQuantizedTensor", "Parameter"]
    for name in ("llama_ssqr", "llama_hptq", "mlp_babai", "mlp_hptq"):
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=name)
