"""Storage formats: how quantized codes are laid out in bytes, and what each byte costs.

``packing`` packs b-bit codes into bytes; ``packed_weight`` defines the packed layer
(codes, group scales and zeros, CSR outliers) as float math; ``outliers`` builds that CSR
correction; ``ssqr`` (sparse outliers, no clipping) and ``hptq`` (canonical Huffman codes
from ``huffman``, one scale, no clipping) are the no-clipping formats, tuned to a target
rate by ``search``; ``allocation`` picks every layer's step from one Lagrange multiplier
(equal marginal loss per stored bit); ``accounting`` counts stored bits per weight.

Torch and numpy only; imports from ``babai_ao.lattice`` (to quantize) and nothing above.
Serving layouts of the codes that are plain tensors (compressed-tensors, GGUF blocks) start
here; the files that carry them live in ``babai_ao.checkpoints``.
"""
