"""Inductor graph passes for babai-ao (torch only; no torchao at import).

``install()`` registers ``BabaiPostGradPass`` (dequantize → mm/addmm ⇒ ``babai::linear``,
folding bias and activation permutation); ``capture_post_grad()`` records post-grad graphs;
``assert_no_float_weight`` proves no quantized layer's float weight is built.

This folder is installed as ``babai_ao.passes``; imported as top-level ``passes`` it hands
over to an installed package of that name, if any (``babai_ao._root_folders``).
"""

from __future__ import annotations

if __name__ != "babai_ao.passes":
    import os as _os
    import runpy as _runpy

    # run the helper file alone: importing babai_ao here, in the middle of the importer's
    # own import (transformers' modeling_utils imports kernels), would re-enter it
    _helper = _os.path.join(_os.path.dirname(__file__), _os.pardir, "babai_ao", "_root_folders.py")
    _runpy.run_path(_helper)["hand_over"](__name__, __file__)
else:
    from .check import assert_no_float_weight, quantized_layers
    from .fuse import BabaiPostGradPass, rewrite_dequant_matmul
    from .install import capture_post_grad, install, installed_pass, uninstall

    __all__ = ["BabaiPostGradPass", "assert_no_float_weight", "capture_post_grad", "install",
               "installed_pass", "quantized_layers", "rewrite_dequant_matmul", "uninstall"]
