"""Quantization orders on real Hessians: every decoder linear of SmolLM2-135M (issue 2).

``tr(D) = Σ_j d_j`` (LDL pivots of the damped ``H`` in quantization order) for natural, act
and min-pivot order; min-pivot's total must be below act-order's. Without clipping, Babai's
bound ``E ≤ B`` must hold on every layer.
"""

from __future__ import annotations

import pytest
import torch

from babai_ao import quantize_weight
from babai_ao.calibration.data import calibration_windows
from babai_ao.calibration.models import load_smollm2
from babai_ao.calibration.sequential import layer_hessians
from babai_ao.lattice.hessian import damped
from babai_ao.lattice.ldl import ORDERS, pivots, quantization_order

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def real():
    model, tok = load_smollm2()
    accs = layer_hessians(model, calibration_windows(tok, n=4, seq_len=256), batch_size=4)
    weights = {n: m.weight.detach() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n in accs}
    return weights, accs


def test_min_pivot_total_trace_below_act(real):
    weights, accs = real
    assert len(accs) == 210
    traces: dict[int, dict[str, float]] = {}  # per distinct Hessian (q/k/v, gate/up share)
    for acc in accs.values():
        if id(acc) in traces:
            continue
        h = damped(acc.hessian, 0.01)[0]
        traces[id(acc)] = {o: float(pivots(h[p][:, p]).sum())
                           for o in ORDERS for p in [quantization_order(h, o)]}
    assert len(traces) == 120
    total = {o: sum(t[o] for t in traces.values()) for o in ORDERS}
    assert total["min-pivot"] < total["act"]
    # det H is order-free: Σ log d_j agrees across orders (a check on the pivots themselves)
    acc = next(iter(accs.values()))
    h = damped(acc.hessian.double(), 0.01)[0]
    logdets = [float(pivots(h[p][:, p]).log().sum()) for o in ORDERS
               for p in [quantization_order(h, o)]]
    assert max(logdets) - min(logdets) < 1e-6 * abs(logdets[0]) + 1e-6


def test_no_clipping_error_within_bound_on_every_layer(real):
    weights, accs = real
    for name, acc in accs.items():
        qw = quantize_weight(weights[name], acc.hessian, bits=4, group_size=64, order="act",
                             clip=False)
        c = qw.certificate
        assert c.clipped == 0
        assert c.error <= c.bound, f"{name}: E={c.error:.4g} > B={c.bound:.4g}"
        assert abs(c.identity - c.error) <= 1e-3 * c.error + 1e-6, name
