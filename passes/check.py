"""Proof that a compiled graph never builds the float weight of a quantized layer.

``assert_no_float_weight(graph)`` (an FX ``Graph``/``GraphModule``, e.g. the post-grad graph
recorded by ``capture_post_grad``) finds the quantized layers from their ``babai::linear`` /
``babai::linear_triton`` / ``babai::dequantize`` nodes — ``N`` = rows of the packed codes,
``K`` = ``in_features`` — and fails if

1. a ``babai::dequantize`` node is left (it returns a float ``[N, K]`` weight);
2. a floating-point tensor with at least ``N·K`` elements is computed from a layer's packed
   codes, zeros or scales (forward data flow from those inputs, not through a ``babai``
   linear op, whose output is an activation) — whatever ops unpack and rescale them;
3. a floating-point graph input or constant has the shape ``[N, K]`` or ``[K, N]`` of a
   quantized layer (the original weight kept alongside the codes).

``assert_no_float_weight(code, layers=[(N, K), ...])`` does the textual version on
Inductor's generated source: no ``babai.dequantize`` call and no float buffer of shape
``(N, K)``/``(K, N)`` allocated (``empty_strided*``). Check 3 uses shapes, so a float input
that merely shares a layer's shape (e.g. a square activation) would be reported too.
"""

from __future__ import annotations

import re

import torch
from torch.fx import Graph, GraphModule, Node

from babai_ao.errors import BabaiError

_LINEAR_NAMES = ("babai.linear.", "babai.linear_triton.")
_DEQUANT_NAMES = ("babai.dequantize.", "babai.dequantize_triton.")


def _name(node: Node) -> str:
    return str(node.target) if node.op == "call_function" else ""


def _is(node: Node, names: tuple[str, ...]) -> bool:
    return any(_name(node).startswith(n) for n in names)


def _layer(node: Node) -> tuple[list[Node], int, int] | None:
    """``([packed, scales, zeros], N, K)`` when ``node`` is a babai op, else ``None``."""
    if _is(node, _LINEAR_NAMES):
        first = 1
    elif _is(node, _DEQUANT_NAMES):
        first = 0
    else:
        return None
    packed = node.args[first]
    k = int(node.args[first + 5])
    return list(node.args[first:first + 3]), int(packed.meta["val"].shape[0]), k


def quantized_layers(graph: Graph) -> list[tuple[int, int]]:
    """Weight shapes ``(N, K)`` of the babai ops in ``graph``."""
    return [lay[1:] for lay in map(_layer, graph.nodes) if lay is not None]


def _float_numel(node: Node) -> int:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor) and val.is_floating_point():
        return val.numel()
    return 0


def _check_graph(graph: Graph, layers: list[tuple[int, int]] | None) -> None:
    problems = []
    found = quantized_layers(graph)
    if not found and not layers:
        raise BabaiError("no babai op in the graph: the quantized layers were not captured "
                         "(check that the model calls torch.ops.babai.linear)")
    shapes = set(found) | set(layers or ())
    for node in graph.nodes:
        if _is(node, _DEQUANT_NAMES):
            problems.append(f"{node.name}: babai::dequantize materializes a float weight")
    sources: dict[Node, int] = {}
    for lay in map(_layer, graph.nodes):
        if lay is not None:
            inputs, n, k = lay
            for a in inputs:
                if isinstance(a, Node):
                    sources[a] = min(sources.get(a, n * k), n * k)
    # forward data flow from packed codes / scales / zeros, stopping at linear ops
    reach: dict[Node, int] = dict(sources)
    for node in graph.nodes:
        if node in reach or _is(node, _LINEAR_NAMES):
            continue
        limits = [reach[a] for a in node.all_input_nodes if a in reach]
        if limits:
            reach[node] = min(limits)
            if _float_numel(node) >= reach[node]:
                problems.append(f"{node.name} ({node.target}): float tensor of "
                                f"{_float_numel(node)} elements computed from packed codes")
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr") and _float_numel(node):
            shape = tuple(node.meta["val"].shape)
            if shape in shapes or shape[::-1] in shapes:
                problems.append(f"{node.name}: float input of quantized-weight shape {shape}")
    if problems:
        raise AssertionError("float weight materialized:\n  " + "\n  ".join(problems))


_ALLOC = re.compile(r"empty_strided\w*\(\((\d+), (\d+)\), \([^)]*\), (torch\.\w+)")


def _check_code(code: str, layers: list[tuple[int, int]]) -> None:
    problems = []
    if "babai.dequantize" in code:
        problems.append("generated code calls babai.dequantize")
    shapes = set(layers) | {(k, n) for n, k in layers}
    for m in _ALLOC.finditer(code):
        shape = (int(m.group(1)), int(m.group(2)))
        if shape in shapes and m.group(3) in ("torch.float32", "torch.float16",
                                               "torch.bfloat16"):
            problems.append(f"buffer {m.group(0)}) has a quantized weight's shape")
    if problems:
        raise AssertionError("float weight materialized:\n  " + "\n  ".join(problems))


def assert_no_float_weight(obj: Graph | GraphModule | str,
                           layers: list[tuple[int, int]] | None = None) -> None:
    """Raise ``AssertionError`` naming each float weight the graph/code builds (see module doc).

    ``layers``: extra ``(N, K)`` weight shapes; required for generated code.
    """
    if isinstance(obj, str):
        if not layers:
            raise BabaiError("checking generated code needs layers=[(N, K), ...]: pass the "
                             "quantized weights' shapes")
        _check_code(obj, layers)
        return
    _check_graph(obj.graph if isinstance(obj, GraphModule) else obj, layers)
