"""Calibration of whole models: Hessians from real data, block by block, and the data itself.

``sequential`` is ``quantize_model``: each decoder block is calibrated on the outputs of the
already-quantized blocks before it, stage by stage (``blocks`` finds the block list, captures
its inputs and groups linears that read one tensor; ``replay`` saves recomputing quantized
outputs; ``report`` holds the per-layer certificates; ``experts`` calibrates fused MoE
experts, one Hessian per expert from its routed tokens). ``data`` makes WikiText-2 windows,
``models`` loads the bundled SmolLM2, ``evaluate`` measures perplexity.

Imports from ``lattice`` and ``ao``; distributed and streamed (larger-than-memory)
calibration belong here, beside ``sequential``.
"""
