"""Calibration of whole models: Hessians from real data, block by block, and the data itself.

``sequential`` is ``quantize_model``: each block (decoder or encoder layer) is calibrated on
the outputs of the already-quantized blocks before it, stage by stage. ``discovery`` finds
the block list (known paths, else the longest outermost ``nn.ModuleList`` of identical
blocks, or the ``blocks=`` path); ``blocks`` captures the first block's inputs and groups
linears that read one tensor; ``layers`` says what is quantized (``nn.Linear``, GPT-2's
``Conv1D`` as a transposed weight); ``batches`` holds token ids with their attention masks
(padded tokens stay out of the Hessians) and the model call; ``lockstep`` runs each batch
through a block once, paused at every stage while it is quantized (the default); ``replay``
saves recomputing quantized outputs when a block is rerun per stage instead; ``report`` holds the per-layer certificates and ``coverage`` lists the
parameters left in float; ``experts`` calibrates fused MoE experts, one Hessian per expert
from its routed tokens; ``tuning`` tunes a finished block's scales, norms and biases towards
the float block with its codes fixed. ``data`` makes WikiText-2 windows, ``models`` loads the
bundled SmolLM2, ``evaluate`` measures perplexity. ``streaming`` calibrates a model larger than
memory: parameters on the meta device, each block read from its checkpoint (safetensors or
GGUF) only while it is calibrated, handed to a sink and freed; ``resume`` keeps a streamed
run's state (finished blocks, the next block's inputs) so a crashed run resumes; ``spill``
keeps a streamed block's inputs and outputs on disk, read batch by batch; ``allocator``
fixes glibc's mmap threshold and trims its heap so a long stream's resident memory stays
flat.
``allocation`` spreads an HPTQ bit budget over the
layers from one Lagrange multiplier (float-model Hessians and a Fisher probe, then
``quantize_model`` at the per-layer targets).

``distributed`` spreads sequential calibration over the ranks of a ``torch.distributed``
group: windows split, Hessian sums reduced, solves spread by cost and broadcast, codes equal
to one process's (block tuning included: the same steps on every rank).

Imports from ``lattice`` and ``ao``.
"""
