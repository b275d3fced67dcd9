"""Inductor post-grad pass: ``babai::dequantize → (convert) → t → mm/addmm`` ⇒ ``babai::linear``.

After AOT decomposition ``F.linear(x, W, b)`` with ``W = babai::dequantize(...)`` reaches the
post-grad graph as ``addmm(b, x2, permute(W, [1, 0]))`` or ``mm`` (+ ``add(·, b)``), with
``x2`` a reshape of ``x``. The pass replaces each such chain by one ``babai::linear`` call on
the packed tensors, so no float weight is built, and folds into it

* a bias: the ``addmm`` input, or a following ``add`` of a 1-D ``[N]`` tensor (through a
  reshape of the product);
* an activation permutation: ``x2 = reshape?(x[..., perm])`` (``aten.index`` on the last dim
  or ``index_select``) becomes ``act_perm=perm`` (the kernel gathers columns on load).

A chain is rewritten only when every intermediate has a single user (otherwise the float
weight is needed elsewhere and stays). ``BabaiPostGradPass.uuid`` hashes this file, so the
FX graph cache tells versions of the pass apart.
"""

from __future__ import annotations

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.fx import Graph, Node

import babai_ao.ao.ops  # noqa: F401  (defines babai::linear / babai::dequantize)

aten = torch.ops.aten
DEQUANT_OPS = (torch.ops.babai.dequantize.default,)
LINEAR_OP = torch.ops.babai.linear.default
_CONVERT = torch.ops.prims.convert_element_type.default
_TRANSPOSE = (aten.permute.default, aten.t.default)
_RESHAPE = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)


def _val(a):
    return a.meta.get("val") if isinstance(a, Node) else a


def _only_user(node: Node) -> Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _is_transpose(node: Node) -> bool:
    if node.target is aten.t.default:
        return True
    return node.target is aten.permute.default and list(node.args[1]) == [1, 0]


def _permutation_source(a: Node, k: int) -> tuple[Node, Node] | None:
    """``(x, perm)`` when ``a`` is ``reshape?(x[..., perm])`` with a 1-D ``perm`` of length K."""
    src = a.args[0] if a.target in _RESHAPE and _val(a).shape[-1] == k else a
    if not isinstance(src, Node) or len(src.users) != 1:
        return None
    x = src.args[0] if src.args else None
    if src.target is aten.index.Tensor:
        idx = list(src.args[1])
        nd = _val(x).dim()
        if len(idx) == nd and all(i is None for i in idx[:-1]) and isinstance(idx[-1], Node):
            perm = idx[-1]
        else:
            return None
    elif src.target is aten.index_select.default and src.args[1] in (-1, _val(x).dim() - 1):
        perm = src.args[2]
    else:
        return None
    pv = _val(perm)
    if pv is None or pv.dim() != 1 or pv.shape[0] != k or pv.is_floating_point():
        return None
    return x, perm


def _fold_bias(out: Node, n: int) -> tuple[Node, Node] | None:
    """``(add node, bias)`` when ``out`` (or its single reshape) feeds only ``add(·, b[N])``."""
    user = _only_user(out)
    if user is not None and user.target in _RESHAPE:
        user = _only_user(user)
    if user is None or user.target is not aten.add.Tensor or user.kwargs.get("alpha", 1) != 1:
        return None
    lhs, rhs = user.args[0], user.args[1]
    bias = rhs if lhs in (out, *out.users) else lhs
    bv = _val(bias)
    if not isinstance(bias, Node) or bv is None or tuple(bv.shape) != (n,):
        return None
    if bv.dtype != _val(out).dtype:
        return None
    return user, bias


def _rewrite_one(graph: Graph, deq: Node) -> bool:
    w = deq
    conv = _only_user(w)
    if conv is not None and conv.target is _CONVERT:
        w = conv
    t = _only_user(w)
    if t is None or not _is_transpose(t):
        return False
    mm = _only_user(t)
    if mm is None or mm.target not in (aten.mm.default, aten.addmm.default):
        return False
    bias = None
    if mm.target is aten.addmm.default:
        bias, a, wt = mm.args[0], mm.args[1], mm.args[2]
        if mm.kwargs.get("beta", 1) != 1 or mm.kwargs.get("alpha", 1) != 1:
            return False
        if _val(bias) is None or _val(bias).dim() != 1:
            return False
    else:
        a, wt = mm.args
    if wt is not t:
        return False
    args = dict(zip(("packed", "scales", "zeros", "bits", "group_size", "in_features",
                     "outlier_ptr", "outlier_idx", "outlier_val"), deq.args))
    args.update({k: v for k, v in deq.kwargs.items() if k != "dtype"})
    n, k = _val(deq).shape
    x, perm = a, None
    found = _permutation_source(a, k)
    folded_add = None
    if bias is None:
        folded_add = _fold_bias(mm, n)
        if folded_add is not None:
            bias = folded_add[1]
    with graph.inserting_before(mm):
        if found is not None:
            x, perm = found
            x = graph.call_function(aten.reshape.default, (x, list(_val(a).shape)))
            x.meta["val"] = _val(a)
        call = (x, args["packed"], args["scales"], args["zeros"], bias, args["bits"],
                args["group_size"], args["in_features"], args.get("outlier_ptr"),
                args.get("outlier_idx"), args.get("outlier_val"), perm)
        new = graph.call_function(LINEAR_OP, call)
        new.meta["val"] = _val(mm)
    mm.replace_all_uses_with(new)
    if folded_add is not None:
        add, _ = folded_add
        add.replace_all_uses_with(add.args[0] if add.args[0] is not bias else add.args[1])
        graph.erase_node(add)
    dead = (mm, t, conv, deq, a, *(a.args[:1] if a.op == "call_function" else ()))
    for node in dict.fromkeys(dead):
        if (isinstance(node, Node) and node.op == "call_function" and not node._erased
                and not node.users):
            graph.erase_node(node)
    return True


def rewrite_dequant_matmul(graph: Graph) -> int:
    """Apply the rewrite to every ``babai::dequantize`` node; returns how many were fused."""
    count = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in DEQUANT_OPS:
            count += _rewrite_one(graph, node)
    if count:
        graph.lint()
    return count


class BabaiPostGradPass(CustomGraphPass):
    """The post-grad pass object for ``torch._inductor.config.post_grad_custom_post_pass``.

    ``recorders`` (lists) receive each graph after the rewrite, for tests and checks.
    """

    def __init__(self) -> None:
        self.recorders: list[list[Graph]] = []
        self.rewrites = 0

    def __call__(self, graph: Graph) -> None:
        self.rewrites += rewrite_dequant_matmul(graph)
        for rec in self.recorders:
            rec.append(graph)

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))
