"""The lattice math: GPTQ as Babai's nearest-plane algorithm, with its certificate.

A layer's input Hessian ``H = XᵀX`` (``hessian``: accumulation, damping, checks) is the Gram
matrix of a lattice. ``ldl`` orders the input dimensions (natural, act-order, min-pivot) and
factors ``H``; ``grid`` is the integer grid ``w ≈ s·(q − z)`` the codes live on; ``babai``
is the nearest-plane pass itself; ``kbest`` keeps K survivors per row instead of one path
(never a larger error than Babai); ``refine`` coordinate descent after it (error never
rises); ``quantize`` ties them into ``quantize_weight``, which returns the codes and the
per-layer certificate ``‖X(w−q)‖² = Σⱼ dⱼ r̃ⱼ² ≤ ¼ Σⱼ dⱼ sⱼ²`` (no clipping).

Pure functions of tensors: torch alone, nothing above this package (``babai_ao.errors``
only). Lattice reduction and other search beyond Babai belong here.
"""
