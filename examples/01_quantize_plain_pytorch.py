"""quantize_ on a plain PyTorch model (no transformers): RTN, then observe/convert calibration.

    python examples/01_quantize_plain_pytorch.py [--small]

Without calibration ``quantize_(model, babai_config(...))`` rounds to nearest (H = I). The
two-step flow observes the Hessian H = XᵀX of every linear's inputs while you run data,
then quantizes each weight with Babai's nearest plane and attaches its certificate.
"""

import argparse
import copy

import torch
from torch import nn
from torchao.quantization import quantize_

from babai_ao import babai_config

p = argparse.ArgumentParser()
p.add_argument("--small", action="store_true", help="smaller model and data (CI)")
args = p.parse_args()
torch.manual_seed(0)
width, batches = (128, 4) if args.small else (512, 32)

model = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
data = [torch.randn(64, width) for _ in range(batches)]
x_test = torch.randn(256, width)
with torch.no_grad():
    ref = model(x_test)

# round-to-nearest: no Hessian
rtn = copy.deepcopy(model)
quantize_(rtn, babai_config(bits=4, group_size=32))

# Babai: observe Hessians, then convert
babai = copy.deepcopy(model)
quantize_(babai, babai_config(bits=4, group_size=32, order="act", step="observe"))
with torch.no_grad():
    for x in data:
        babai(x)
quantize_(babai, babai_config(bits=4, group_size=32, order="act", step="convert"))

with torch.no_grad():
    for name, m in (("rtn", rtn), ("babai", babai)):
        err = (m(x_test) - ref).pow(2).mean().item()
        print(f"{name:>5}: output MSE {err:.3e}")
for i in (0, 2):
    c = babai[i].weight.certificate
    print(f"layer {i}: {type(babai[i].weight).__name__}, error {c.error:.4g} <= "
          f"bound {c.bound:.4g}: {c.bound_holds} (clipped {c.clipped})")
