"""Calibration of whole models: Hessians from real data, block by block, and the data itself.

``sequential`` is ``quantize_model``: each block (decoder or encoder layer) is calibrated on
the outputs of the already-quantized blocks before it, stage by stage. ``discovery`` finds
the block list (known paths, else the longest outermost ``nn.ModuleList`` of identical
blocks, or the ``blocks=`` path); ``blocks`` captures the first block's inputs and groups
linears that read one tensor; ``layers`` says what is quantized (``nn.Linear``, GPT-2's
``Conv1D`` as a transposed weight); ``batches`` holds token ids with their attention masks
(padded tokens stay out of the Hessians) and the model call; ``replay`` saves recomputing
quantized outputs; ``report`` holds the per-layer certificates and ``coverage`` lists the
parameters left in float; ``experts`` calibrates fused MoE experts, one Hessian per expert
from its routed tokens. ``data`` makes WikiText-2 windows, ``models`` loads the bundled
SmolLM2, ``evaluate`` measures perplexity. ``distributed`` spreads sequential calibration over
the ranks of a ``torch.distributed`` group: windows split, Hessian sums reduced, solves
spread by cost and broadcast, codes equal to one process's.

Imports from ``lattice`` and ``ao``; streamed (larger-than-memory) calibration belongs
here too, beside ``sequential``.
"""
