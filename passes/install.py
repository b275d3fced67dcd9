"""Installing the post-grad pass through Inductor's documented hook, and capturing graphs.

``install()`` adds the pass to ``torch._inductor.config.post_grad_custom_post_pass`` (keeping
any pass already there: the hook accepts a list). ``capture_post_grad()`` yields a list that
receives every post-grad graph compiled inside the ``with`` block (after the rewrite), with
the FX graph cache off so cached compilations do not skip the pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch._functorch.config as functorch_config
import torch._inductor.config as inductor_config
from torch.fx import Graph

from .fuse import BabaiPostGradPass

_PASS = BabaiPostGradPass()


def installed_pass() -> BabaiPostGradPass:
    """The process-wide pass object (whether or not it is installed)."""
    return _PASS


def install() -> BabaiPostGradPass:
    """Register the babai post-grad pass (idempotent)."""
    cur = inductor_config.post_grad_custom_post_pass
    if cur is None:
        inductor_config.post_grad_custom_post_pass = _PASS
    elif cur is not _PASS and not (isinstance(cur, list | tuple) and _PASS in cur):
        others = list(cur) if isinstance(cur, list | tuple) else [cur]
        inductor_config.post_grad_custom_post_pass = [*others, _PASS]
    return _PASS


def uninstall() -> None:
    """Remove the babai pass, leaving other registered passes in place."""
    cur = inductor_config.post_grad_custom_post_pass
    if cur is _PASS:
        inductor_config.post_grad_custom_post_pass = None
    elif isinstance(cur, list | tuple) and _PASS in cur:
        rest = [p for p in cur if p is not _PASS]
        inductor_config.post_grad_custom_post_pass = rest or None


@contextmanager
def capture_post_grad() -> Iterator[list[Graph]]:
    """Install the pass for the block and collect the post-grad graphs it sees."""
    was = inductor_config.post_grad_custom_post_pass
    install()
    graphs: list[Graph] = []
    _PASS.recorders.append(graphs)
    try:
        with (inductor_config.patch(fx_graph_cache=False),
              functorch_config.patch(enable_autograd_cache=False)):
            yield graphs
    finally:
        _PASS.recorders.remove(graphs)
        inductor_config.post_grad_custom_post_pass = was
